"""The model: LLaVA-NeXT loaded once, serving batches. Knows nothing of Celery.

Batch-first: lists of prepared inputs in, lists of outputs of the same length out (checked).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from producer.errors import InvalidRequest, JobTimeout
from worker.runtime import scoring
from worker.runtime.decoding import DecodeBatch, Pending, Row, advance, filled_layers, merge_left_padded
from worker.runtime.loading import load_model
from worker.runtime.prefix import PrefixCache
from worker.runtime.scoring import LabelQuery
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One image and the user's text for it."""

    image: Image.Image
    text: str


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters shared by every prompt of a batch."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # sampled rows of the continuous engine: None draws one from torch's RNG


@dataclass(frozen=True, eq=False)
class Prepared:
    """A prompt after the processor (done in the job's own thread, off the model's path)."""

    input_ids: torch.Tensor  # (tokens,)
    pixel_values: torch.Tensor  # (tiles, 3, H, W)
    image_size: torch.Tensor  # (2,): height, width
    image_tokens: int
    image_digest: str = ""  # the decoded image's hash (prefix cache on): same image, same KV prefix

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class LabelScores:
    """One image's labels, in the labels' order. ``logprobs``: exclusive mode, log P(the answer is exactly
    the label, end-of-turn token included); multi-label mode, log P(the answer to the label's question is
    exactly "Yes"). ``scores``: exclusive, the softmax of ``logprobs`` over the labels; multi-label,
    P(Yes) / (P(Yes) + P(No)) per label."""

    logprobs: list[float]
    scores: list[float]
    prompt_tokens: int
    image_tokens: int


class Runtime:
    """LLaVA-NeXT loaded once. ``prepare`` is thread-safe (processor only); ``generate`` and
    ``score_labels`` run the model and belong to one thread (the batcher's)."""

    loads: ClassVar[int] = 0  # how many models this process has loaded (health reports it)

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        started = time.perf_counter()
        self.model, self.processor, self.source = load_model(settings)
        self.load_seconds = time.perf_counter() - started
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.attention = str(self.model.config._attn_implementation)
        self.image_token_id = int(self.model.config.image_token_id)
        self.pad_token_id = int(self.processor.tokenizer.pad_token_id)
        self.context_length = settings.context_length or int(self._text_config.max_position_embeddings)
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"
        torch.manual_seed(settings.seed)
        Runtime.loads += 1
        log.info("loaded model: %s", self.info())

    @property
    def _text_config(self) -> PreTrainedConfig:
        # LlavaNextConfig types ``text_config`` as its constructor takes it (``dict | PreTrainedConfig |
        # None``); once built it is always the language model's ``PreTrainedConfig``.
        return cast("PreTrainedConfig", self.model.config.text_config)

    def info(self) -> dict[str, Any]:
        """What was loaded: model, source, dtype, device, attention, parameter count, load time."""
        return {
            "model": self.settings.served_model_name,
            "source": self.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attention": self.attention,
            "image_processor": type(self.processor.image_processor).__name__,
            "quantization": self.settings.quantization,
            "context_length": self.context_length,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "load_seconds": round(self.load_seconds, 3),
        }

    def prompt_text(self, text: str) -> str:
        """The full prompt for one image and ``text``, through the checkpoint's chat template."""
        # transformers types a message's values as str; a multimodal content is a list of parts.
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))

    def prepare(
        self, prompt: Prompt, reserve: int = 0, processor: Callable[..., Any] | None = None
    ) -> Prepared:
        """Run the processor (or ``processor``, called the same way: a preprocessing pool) on one prompt;
        refuse it if ``reserve`` new tokens would not fit."""
        inputs = (processor or self.processor)(
            images=[prompt.image], text=[self.prompt_text(prompt.text)], return_tensors="pt"
        )
        prepared = Prepared(
            input_ids=inputs["input_ids"][0],
            pixel_values=inputs["pixel_values"][0],
            image_size=inputs["image_sizes"][0],
            image_tokens=int((inputs["input_ids"][0] == self.image_token_id).sum()),
            image_digest=_digest(prompt.image) if self.settings.prefix_cache_tokens else "",
        )
        if prepared.prompt_tokens + reserve > self.context_length:
            raise InvalidRequest(
                f"the prompt takes {prepared.prompt_tokens} tokens (image included); with {reserve} new "
                f"tokens that is over the context length of {self.context_length} (context_length)"
            )
        return prepared

    def collate(self, batch: Sequence[Prepared], pixels: bool = True) -> dict[str, torch.Tensor]:
        """One batch: input ids left-padded, pixel tiles zero-padded (as the processor pads a batch).
        ``pixels=False``: ids and mask only (decoding after :meth:`_prefill` needs no pixels)."""
        width = max(p.prompt_tokens for p in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, width - item.prompt_tokens :] = item.input_ids
            attention_mask[row, width - item.prompt_tokens :] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if not pixels:
            return inputs
        tiles = max(p.pixel_values.shape[0] for p in batch)
        pixel_values = torch.zeros((len(batch), tiles, *batch[0].pixel_values.shape[1:]))
        for row, item in enumerate(batch):
            pixel_values[row, : item.pixel_values.shape[0]] = item.pixel_values
        return {
            **inputs,
            "pixel_values": pixel_values.to(self.device, self.dtype),
            "image_sizes": torch.stack([p.image_size for p in batch]).to(self.device),
        }

    def generate(
        self,
        batch: Sequence[Prepared],
        sampling: Sampling,
        deadlines: Sequence[float] | None = None,
        step_hook: Callable[[], None] | None = None,
    ) -> list[Generation | JobTimeout]:
        """One batched ``generate`` (greedy when ``temperature == 0``); one answer per prepared prompt.

        ``deadlines`` (``time.monotonic()`` values, one per prompt) stop each row at its own deadline: that
        row's answer is a :class:`JobTimeout` and the rest of the batch goes on. ``step_hook`` runs once per
        decoding step (fault injection for tests).
        """
        if not batch:
            return []
        inputs = self.collate(batch, pixels=False)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": False}
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        stop = _StopAtDeadlines(deadlines or [math.inf] * len(batch), step_hook)
        with torch.inference_mode():
            cache = self._prefill(batch)
            output = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                **{self._cache_kwarg: cache},
                **options,
                pad_token_id=self.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stop]),
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        results: list[Generation | JobTimeout] = []
        for row, (item, tensor) in enumerate(zip(batch, new_tokens, strict=True)):
            tokens = tensor.tolist()
            if stop.cut_short(row, tokens, self._eos_ids(), sampling.max_new_tokens):
                results.append(
                    JobTimeout("the job's generation ran past its deadline (job_timeout / timeout_s)")
                )
                continue
            length = self._generated_length(tokens)
            text = self.processor.decode(tokens[:length], skip_special_tokens=True).strip()
            results.append(Generation(text, item.prompt_tokens, item.image_tokens, length))
        return _checked(results, batch)

    def _prefill(self, batch: Sequence[Prepared]) -> DynamicCache:
        """Each prompt but its last token, prefilled alone (no padding), merged into one left-padded cache.

        A padded batch prefill pushes attention off its fast causal path (3x slower on CPU for mixed image
        sizes, measured in bench/); prefilling apart and decoding together gives the same tokens (tested)
        and keeps decoding, where batching pays, batched. ``generate`` then runs only the last prompt token.
        """
        caches = []
        for item in batch:
            single = self.collate([item])
            output = self.model(
                input_ids=single["input_ids"][:, :-1],
                attention_mask=single["attention_mask"][:, :-1],
                pixel_values=single["pixel_values"],
                image_sizes=single["image_sizes"],
                use_cache=True,
                logits_to_keep=1,
            )
            caches.append(getattr(output, self._cache_kwarg))
        return merge_left_padded(caches)

    # -- step-level API of the continuous-batching engine (worker/engine.py); the model thread only

    def begin_row(self, prepared: Prepared, sampling: Sampling) -> Pending:
        """A row to prefill, chunk by chunk, with :meth:`prefill_chunk`."""
        return Pending(prepared, sampling, cache=DynamicCache(config=self.model.config))

    def prefill_chunk(
        self, pending: Pending, tokens: int, prefix: PrefixCache | None = None
    ) -> tuple[Row, DynamicCache] | None:
        """Prefill up to ``tokens`` more of the row's prompt (positions follow from its cache). The first
        chunk takes the image's prefix from ``prefix`` if there (no vision tower), else computes the
        prompt's input embeddings, and ``prefix`` keeps a copy of the prefix once prefilled. The whole
        prompt done: the row with its first token and its cache (for ``DecodeBatch.join(row, cache)``)."""
        with torch.inference_mode():
            if pending.embeds is None:
                self._start(pending, prefix)
            assert pending.embeds is not None
            end = pending.done + min(tokens, pending.left)
            output = self.model(
                inputs_embeds=pending.embeds[:, pending.done - pending.start : end - pending.start],
                **{self._cache_kwarg: pending.cache},
                use_cache=True,
                logits_to_keep=1,
            )
        pending.done = end
        if prefix is not None and pending.prefix_key is not None and end >= pending.prefix_length:
            length, layers = pending.prefix_length, filled_layers(pending.cache)
            kv = [(x.keys[:, :, :length], x.values[:, :, :length]) for x in layers]
            prefix.put(pending.prefix_key, length, kv)
            pending.prefix_key = None
        if pending.left:
            return None
        row = Row(pending.prepared, pending.sampling, generator=self._generator(pending.sampling))
        self._append(row, output.logits[0, -1])
        return row, pending.cache

    def _start(self, pending: Pending, prefix: PrefixCache | None) -> None:
        """The prompt's embeddings from the image's cached prefix on, or all of them (image features
        merged by the model's own ``get_image_features`` and placeholder mask)."""
        found = prefix.key(pending.prepared, self.image_token_id) if prefix is not None else None
        layers = prefix.get(found[0]) if prefix is not None and found is not None else None
        if found is not None and layers is not None:
            for index, (keys, values) in enumerate(layers):
                pending.cache.update(keys, values, index)
            ids = pending.prepared.input_ids[found[1] :].to(self.device)
            pending.embeds = self.model.get_input_embeddings()(ids[None])
            pending.start = pending.done = found[1]
            return
        pending.embeds = self._prompt_embeds(pending.prepared)
        pending.prefix_key, pending.prefix_length = found if found is not None else (None, 0)

    def _prompt_embeds(self, prepared: Prepared) -> torch.Tensor:
        inputs = self.collate([prepared])
        embeds = self.model.get_input_embeddings()(inputs["input_ids"])
        features = self.model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output
        features = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
        mask = self.model.model.get_placeholder_mask(inputs["input_ids"], embeds, features)
        return embeds.masked_scatter(mask, features)

    def decode_step(self, batch: DecodeBatch) -> None:
        """One decoding step: every row of ``batch`` gets its next token (``row.ended`` tells who is done)."""
        inputs = batch.step_inputs()
        with torch.inference_mode():
            output = self.model(**inputs, **{self._cache_kwarg: batch.cache}, use_cache=True)
        for row, logits in zip(batch.rows, output.logits[:, -1], strict=True):
            self._append(row, logits)

    def finish_row(self, row: Row) -> Generation:
        """A finished row's answer."""
        length = self._generated_length(row.tokens)
        text = self.processor.decode(row.tokens[:length], skip_special_tokens=True).strip()
        return Generation(text, row.prepared.prompt_tokens, row.prepared.image_tokens, length)

    def kv_bytes_per_token(self) -> int:
        """Bytes one token takes in the KV cache (keys and values of every layer)."""
        text = self._text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return 2 * text.num_hidden_layers * heads * head_dim * torch.finfo(self.dtype).bits // 8

    def kv_budget_tokens(self) -> int:
        """The engine's admission budget in KV tokens: ``kv_cache_tokens``, else on CUDA
        ``gpu_memory_fraction`` of the free memory after loading, else (CPU) ``cpu_kv_cache_tokens``."""
        if self.settings.kv_cache_tokens:
            return self.settings.kv_cache_tokens
        if self.device.type != "cuda":
            return self.settings.cpu_kv_cache_tokens
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * self.settings.gpu_memory_fraction) // self.kv_bytes_per_token()

    def _append(self, row: Row, logits: torch.Tensor) -> None:
        advance(row, logits, self._eos_ids())

    def _generator(self, sampling: Sampling) -> torch.Generator | None:
        if sampling.temperature <= 0:
            return None
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return {eos} if isinstance(eos, int) else set(eos or [])

    def _generated_length(self, row: list[int]) -> int:
        """Tokens generated up to and including the first end-of-sequence token."""
        eos_ids = self._eos_ids()
        return next((index + 1 for index, token in enumerate(row) if token in eos_ids), len(row))

    def score_labels(
        self,
        batch: Sequence[Prepared],
        labels: Sequence[list[str]],
        deadlines: Sequence[float] | None = None,
        *,
        queries: Sequence[LabelQuery],
    ) -> list[LabelScores | BaseException]:
        """Score each image's labels (see :mod:`worker.runtime.scoring`): ``queries[i]`` says how (the text
        the prompt was prepared from; a question template for multi-label mode). Each image's shared prompt
        is prefilled alone (no padding: attention's fast causal path), the caches are merged left-padded,
        then ONE forward pass scores every label of every image (each row its own labels' prefix tree),
        or one per group of similar shapes when padding would cost more (:func:`scoring.forward_groups`).
        A prompt whose deadline has passed gets a :class:`JobTimeout`, one whose labels cannot be scored
        (``InvalidRequest``) its error; neither stops the others."""
        if not len(batch) == len(labels) == len(queries):
            raise ValueError(f"{len(batch)} prompts, {len(labels)} label lists, {len(queries)} queries")
        deadlines = deadlines or [math.inf] * len(batch)
        results: list[LabelScores | BaseException | None] = [None] * len(batch)
        plans: dict[int, _Scoring] = {}
        now = time.monotonic()
        for index, (item, options, deadline, query) in enumerate(
            zip(batch, labels, deadlines, queries, strict=True)
        ):
            if now >= deadline:
                results[index] = JobTimeout("the job ran past its deadline waiting to be scored")
                continue
            try:
                plans[index] = self._plan_scoring(item, options, query)
            except Exception as exc:  # this image's labels only; out of memory is the whole call's
                if self.is_out_of_memory(exc):
                    raise
                results[index] = exc
        indices, jobs = list(plans), list(plans.values())
        shapes = [(len(job.ids), len(job.plan.tree.tokens)) for job in jobs]
        for group in scoring.forward_groups(shapes):
            with torch.inference_mode():
                scored = self._score_together([jobs[k] for k in group])
            for k, output in zip(group, scored, strict=True):
                results[indices[k]] = output
        return _checked(results, batch)

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the device ran out of memory."""
        return isinstance(error, (torch.OutOfMemoryError, MemoryError))

    def memory(self) -> dict[str, float]:
        """Device memory in MB (CUDA only)."""
        if self.device.type != "cuda":
            return {}
        return {
            "cuda_allocated_mb": round(torch.cuda.memory_allocated(self.device) / 1e6, 1),
            "cuda_reserved_mb": round(torch.cuda.memory_reserved(self.device) / 1e6, 1),
            "cuda_total_mb": round(torch.cuda.get_device_properties(self.device).total_memory / 1e6, 1),
        }

    def free_memory(self) -> None:
        """Give memory back after an out-of-memory error: collect unreachable tensors, then (CUDA) return
        the allocator's cache. Call it after leaving the ``except`` block, or the failed attempt's tensors
        are still alive through the traceback."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _plan_scoring(self, item: Prepared, labels: list[str], query: LabelQuery) -> _Scoring:
        answers = scoring.candidates(self.processor, query, tuple(labels), frozenset(self._eos_ids()))
        plan = scoring.LabelPlan.of(answers)
        ids = list(answers[0].ids[: plan.prefix])
        image = ids.index(self.image_token_id)
        expanded = [*ids[:image], *[self.image_token_id] * item.image_tokens, *ids[image + 1 :]]
        if item.input_ids[: image + item.image_tokens].tolist() != expanded[: image + item.image_tokens]:
            raise RuntimeError("the labels' prompt does not start as the prepared prompt does")
        return _Scoring(item, query, plan, expanded)

    def _score_together(self, jobs: Sequence[_Scoring]) -> list[LabelScores]:
        """Prefill each job's shared prefix alone, then one forward over the merged caches: row i packs job
        i's tree (padded to the most nodes) under its own 4D mask and position ids."""
        prefills = [self._prefill_prefix(job.item, job.ids) for job in jobs]
        firsts = [first for _, first in prefills]
        cache = merge_left_padded([cache for cache, _ in prefills])
        del prefills
        trees, widths = [job.plan.tree for job in jobs], [len(job.ids) for job in jobs]
        nodes = max(len(tree.tokens) for tree in trees)
        tokens = torch.full((len(jobs), nodes), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(jobs), nodes), dtype=torch.long)
        for row, (tree, width) in enumerate(zip(trees, widths, strict=True)):
            tokens[row, : len(tree.tokens)] = torch.tensor(tree.tokens)
            positions[row, : len(tree.tokens)] = torch.tensor(tree.depths) + width
        kept = [job.plan.kept() for job in jobs]
        union = sorted(set().union(*kept))  # positions some row keeps logits of
        with self._attention_for_masks() as attention:
            output = self.model(
                input_ids=tokens.to(self.device),
                attention_mask=scoring.attention_mask(trees, widths, attention, self.dtype).to(self.device),
                position_ids=positions.to(self.device),
                **{self._cache_kwarg: cache},
                logits_to_keep=torch.tensor(union, dtype=torch.long, device=self.device),
            )
        column = {node: index for index, node in enumerate(union)}
        results = []
        for row, (job, first, nodes_kept) in enumerate(zip(jobs, firsts, kept, strict=True)):
            logits = output.logits[row]  # one image's rows: no copy when it keeps them all
            picked = logits if nodes_kept == union else logits[[column[node] for node in nodes_kept]]
            picked = picked.float()
            logprobs = job.plan.logprobs(torch.cat([first[None], picked]).log_softmax(dim=-1))
            results.append(self._label_scores(job, logprobs))
        return results

    @staticmethod
    def _label_scores(job: _Scoring, logprobs: list[float]) -> LabelScores:
        if job.query.question is None:
            scores = scoring.exclusive_scores(logprobs)
        else:
            logprobs, no = logprobs[0::2], logprobs[1::2]
            scores = scoring.yes_no_scores(logprobs, no)
        return LabelScores(logprobs, scores, job.item.prompt_tokens, job.item.image_tokens)

    @contextlib.contextmanager
    def _attention_for_masks(self) -> Iterator[str]:
        """The language model's attention for a custom 4D mask: SDPA or eager as loaded; any other
        (FlashAttention-2 takes no such mask) is switched to SDPA for the call."""
        loaded = str(self._text_config._attn_implementation)
        if loaded in ("sdpa", "eager"):
            yield loaded
            return
        self.model.set_attn_implementation({"text_config": "sdpa"})
        try:
            yield "sdpa"
        finally:
            self.model.set_attn_implementation({"text_config": loaded})

    def _prefill_prefix(self, item: Prepared, ids: Sequence[int]) -> tuple[DynamicCache, torch.Tensor]:
        """Prefill the labels' shared prefix (``ids``: its image token expanded to the prompt's), keeping
        the logits of its last position only; the cache and those logits."""
        single = self.collate([item])
        output = self.model(
            input_ids=torch.tensor([list(ids)], device=self.device),
            pixel_values=single["pixel_values"],
            image_sizes=single["image_sizes"],
            use_cache=True,
            logits_to_keep=1,
        )
        return getattr(output, self._cache_kwarg), output.logits[0, -1].float()


@dataclass(frozen=True, eq=False)
class _Scoring:
    """One image's labels, planned: its prompt, how to score, its packed answers, the prefix to prefill."""

    item: Prepared
    query: LabelQuery
    plan: scoring.LabelPlan
    ids: list[int]  # the answers' shared prefix, its one image token expanded to the prompt's


class _StopAtDeadlines(StoppingCriteria):
    """Stops each row of a batch at its own deadline (per-row booleans, as transformers allows) and
    remembers after how many new tokens each row's deadline struck."""

    def __init__(self, deadlines: Sequence[float], step_hook: Callable[[], None] | None) -> None:
        self.deadlines = torch.tensor(list(deadlines), dtype=torch.float64)
        self.struck_at: list[int | None] = [None] * len(deadlines)
        self.steps = 0
        self.step_hook = step_hook

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        if self.step_hook is not None:
            self.step_hook()
        done = self.deadlines <= time.monotonic()
        for row, expired in enumerate(done.tolist()):
            if expired and self.struck_at[row] is None:
                self.struck_at[row] = self.steps
        # transformers annotates ``torch.BoolTensor``, a legacy type that no torch op is typed to return.
        return cast(torch.BoolTensor, done.to(input_ids.device))

    def cut_short(self, row: int, tokens: list[int], eos_ids: set[int], limit: int) -> bool:
        """Whether the deadline, not the row's end of sequence or its token limit, ended this row."""
        struck = self.struck_at[row]
        if struck is None or struck >= limit:
            return False
        return not any(token in eos_ids for token in tokens[:struck])


def _digest(image: Image.Image) -> str:
    """A hash of the decoded image (mode, size, pixels): what its features depend on."""
    digest = hashlib.blake2b(f"{image.mode}:{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


def _checked(results: list[Any], batch: Sequence[Any]) -> list[Any]:
    if len(results) != len(batch):
        raise RuntimeError(f"runtime returned {len(results)} outputs for {len(batch)} inputs")
    return results
