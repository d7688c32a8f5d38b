"""The model: LLaVA-NeXT loaded once, serving batches. Knows nothing of Celery.

Batch-first: lists of prepared inputs in, lists of outputs of the same length out (checked).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from producer.errors import InvalidRequest, JobTimeout
from worker.runtime import scoring
from worker.runtime.decoding import DecodeBatch, Row, pick
from worker.runtime.loading import load_model
from worker.runtime.scoring import LabelQuery
from worker.settings import WorkerSettings

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
        self.context_length = settings.context_length or int(
            self.model.config.text_config.max_position_embeddings
        )
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; accept both.
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"
        torch.manual_seed(settings.seed)
        Runtime.loads += 1
        log.info("loaded model: %s", self.info())

    def info(self) -> dict[str, Any]:
        """What was loaded: model, source, dtype, device, attention, parameter count, load time."""
        return {
            "model": self.settings.served_model_name,
            "source": self.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attention": self.attention,
            "quantization": self.settings.quantization,
            "context_length": self.context_length,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "load_seconds": round(self.load_seconds, 3),
        }

    def prompt_text(self, text: str) -> str:
        """The full prompt for one image and ``text``, through the checkpoint's chat template."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))

    def prepare(self, prompt: Prompt, reserve: int = 0) -> Prepared:
        """Run the processor on one prompt; refuse it if ``reserve`` new tokens would not fit."""
        inputs = self.processor(
            images=[prompt.image], text=[self.prompt_text(prompt.text)], return_tensors="pt"
        )
        prepared = Prepared(
            input_ids=inputs["input_ids"][0],
            pixel_values=inputs["pixel_values"][0],
            image_size=inputs["image_sizes"][0],
            image_tokens=int((inputs["input_ids"][0] == self.image_token_id).sum()),
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
        width = max(item.prompt_tokens for item in batch) - 1
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
        merged = DynamicCache()
        for layer in range(len(caches[0].layers)):
            keys, values = [], []
            for cache in caches:
                pad = width - cache.layers[layer].keys.shape[2]
                keys.append(torch.nn.functional.pad(cache.layers[layer].keys, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(cache.layers[layer].values, (0, 0, pad, 0)))
            merged.update(torch.cat(keys), torch.cat(values), layer)
        return merged

    # -- step-level API of the continuous-batching engine (worker/engine.py); the model thread only

    def start_row(self, prepared: Prepared, sampling: Sampling) -> tuple[Row, DynamicCache]:
        """Prefill one prompt alone (pixels included, no padding) and pick its first token. The row joins
        a :class:`DecodeBatch` with ``batch.join(row, cache)``."""
        with torch.inference_mode():
            output = self.model(**self.collate([prepared]), use_cache=True, logits_to_keep=1)
        row = Row(prepared, sampling, generator=self._generator(sampling))
        self._append(row, output.logits[0, -1])
        return row, getattr(output, self._cache_kwarg)

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
        text = self.model.config.text_config
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
        row.tokens.append(pick(row, logits))
        row.ended = row.tokens[-1] in self._eos_ids() or len(row.tokens) >= row.sampling.max_new_tokens

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
    ) -> list[LabelScores | JobTimeout]:
        """Score each image's labels (see :mod:`worker.runtime.scoring`): ``queries[i]`` says how (the text
        the prompt was prepared from; a question template for multi-label mode). Per image, one prefill of
        the shared prompt, then all its labels in one packed forward pass over that prefill's KV cache;
        images one after another. A prompt whose deadline has passed when its turn comes gets a
        :class:`JobTimeout` instead."""
        if not len(batch) == len(labels) == len(queries):
            raise ValueError(f"{len(batch)} prompts, {len(labels)} label lists, {len(queries)} queries")
        deadlines = deadlines or [math.inf] * len(batch)
        results: list[LabelScores | JobTimeout] = []
        with torch.inference_mode():
            for item, options, deadline, query in zip(batch, labels, deadlines, queries, strict=True):
                if time.monotonic() >= deadline:
                    results.append(JobTimeout("the job ran past its deadline waiting to be scored"))
                else:
                    results.append(self._score_one(item, options, query))
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

    def _score_one(self, item: Prepared, labels: list[str], query: LabelQuery) -> LabelScores:
        answers = scoring.candidates(self.processor, query, tuple(labels), frozenset(self._eos_ids()))
        prefix = min(scoring.common_prefix([a.ids for a in answers]), *(a.start for a in answers))
        tree = scoring.PackedTree.build([a.ids[prefix:] for a in answers])
        cache, first = self._prefill_prefix(item, answers[0].ids[:prefix])
        expanded = prefix + item.image_tokens - 1
        positions = torch.tensor(tree.depths) + expanded
        kept = tree.predicting(answers, prefix)
        with self._attention_for_masks() as attention:
            output = self.model(
                input_ids=torch.tensor([tree.tokens], device=self.device),
                attention_mask=scoring.attention_mask(tree, expanded, attention, self.dtype).to(self.device),
                position_ids=positions[None].to(self.device),
                **{self._cache_kwarg: cache},
                logits_to_keep=torch.tensor(kept, device=self.device),
            )
        rows = torch.cat([first[None], output.logits[0].float()]).log_softmax(dim=-1)
        logprobs = scoring.answer_logprobs(answers, prefix, tree, rows)
        if query.question is None:
            scores = scoring.exclusive_scores(logprobs)
        else:
            logprobs, no = logprobs[0::2], logprobs[1::2]
            scores = scoring.yes_no_scores(logprobs, no)
        return LabelScores(logprobs, scores, item.prompt_tokens, item.image_tokens)

    @contextlib.contextmanager
    def _attention_for_masks(self) -> Iterator[str]:
        """The language model's attention for a custom 4D mask: SDPA or eager as loaded; any other
        (FlashAttention-2 takes no such mask) is switched to SDPA for the call."""
        loaded = str(self.model.config.text_config._attn_implementation)
        if loaded in ("sdpa", "eager"):
            yield loaded
            return
        self.model.set_attn_implementation({"text_config": "sdpa"})
        try:
            yield "sdpa"
        finally:
            self.model.set_attn_implementation({"text_config": loaded})

    def _prefill_prefix(self, item: Prepared, ids: Sequence[int]) -> tuple[DynamicCache, torch.Tensor]:
        """Prefill the labels' shared prefix (its one image token expanded to the prompt's), keeping the
        logits of its last position only; the cache and those logits."""
        image = ids.index(self.image_token_id)
        expanded = [*ids[:image], *[self.image_token_id] * item.image_tokens, *ids[image + 1 :]]
        if item.input_ids[: image + item.image_tokens].tolist() != expanded[: image + item.image_tokens]:
            raise RuntimeError("the labels' prompt does not start as the prepared prompt does")
        single = self.collate([item])
        output = self.model(
            input_ids=torch.tensor([expanded], device=self.device),
            pixel_values=single["pixel_values"],
            image_sizes=single["image_sizes"],
            use_cache=True,
            logits_to_keep=1,
        )
        return getattr(output, self._cache_kwarg), output.logits[0, -1].float()


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
        return done.to(input_ids.device)

    def cut_short(self, row: int, tokens: list[int], eos_ids: set[int], limit: int) -> bool:
        """Whether the deadline, not the row's end of sequence or its token limit, ended this row."""
        struck = self.struck_at[row]
        if struck is None or struck >= limit:
            return False
        return not any(token in eos_ids for token in tokens[:struck])


def _checked(results: list[Any], batch: Sequence[Any]) -> list[Any]:
    if len(results) != len(batch):
        raise RuntimeError(f"runtime returned {len(results)} outputs for {len(batch)} inputs")
    return results
