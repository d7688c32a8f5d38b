"""The model: LLaVA-NeXT loaded once, serving batches. Knows nothing of Celery.

Batch-first: lists of prepared inputs in, lists of outputs of the same length out (checked).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from producer.errors import InvalidRequest
from worker.runtime.loading import load_model
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


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class LabelScores:
    """Mean token log-likelihood of each label's tokens after the prompt, in the labels' order."""

    log_likelihoods: list[float]
    prompt_tokens: int
    image_tokens: int


class Runtime:
    """LLaVA-NeXT loaded once; ``generate`` and ``score_labels`` serve batches (one at a time)."""

    loads: ClassVar[int] = 0  # how many models this process has loaded (health reports it)

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        started = time.perf_counter()
        self.model, self.processor, self.source = load_model(settings)
        self.load_seconds = time.perf_counter() - started
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.attention = str(self.model.config._attn_implementation)
        self.image_token_id = int(self.model.config.image_token_id)
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

    def _encode(self, prompts: list[Prompt], reserve: int = 0) -> Any:
        """Processor inputs for ``prompts``; refuses any prompt that leaves no room for ``reserve`` tokens."""
        inputs = self.processor(
            images=[p.image for p in prompts],
            text=[self.prompt_text(p.text) for p in prompts],
            return_tensors="pt",
            padding=True,
        )
        longest = int(inputs["attention_mask"].sum(dim=1).max())
        if longest + reserve > self.context_length:
            raise InvalidRequest(
                f"the prompt takes {longest} tokens (image included); with {reserve} new tokens that is over "
                f"the context length of {self.context_length} (context_length)"
            )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs.to(self.device)

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Generation]:
        """Generate one answer per prompt (greedy when ``temperature == 0``)."""
        if not prompts:
            return []
        with self._lock, torch.inference_mode():
            inputs = self._encode(prompts, reserve=sampling.max_new_tokens)
            options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": False}
            if sampling.temperature > 0:
                options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            output = self.model.generate(
                **inputs, **options, pad_token_id=self.processor.tokenizer.pad_token_id
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        results = [
            Generation(
                text=self.processor.decode(
                    row[: self._generated_length(row)], skip_special_tokens=True
                ).strip(),
                prompt_tokens=int(inputs["attention_mask"][i].sum()),
                image_tokens=int((inputs["input_ids"][i] == self.image_token_id).sum()),
                generated_tokens=self._generated_length(row),
            )
            for i, row in enumerate(new_tokens)
        ]
        return _checked(results, prompts)

    def _generated_length(self, row: torch.Tensor) -> int:
        """Tokens generated up to and including the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        for index, token in enumerate(row.tolist()):
            if token in eos_ids:
                return index + 1
        return len(row)

    def score_labels(self, prompts: list[Prompt], labels: list[list[str]]) -> list[LabelScores]:
        """Mean token log-likelihood of each label after its prompt: one prefill per image, then all
        labels scored in one forward pass that reuses the prefill's KV cache."""
        if len(prompts) != len(labels):
            raise ValueError(f"{len(prompts)} prompts but {len(labels)} label lists")
        with self._lock, torch.inference_mode():
            pairs = zip(prompts, labels, strict=True)
            results = [self._score_one(prompt, options) for prompt, options in pairs]
        return _checked(results, prompts)

    def _score_one(self, prompt: Prompt, labels: list[str]) -> LabelScores:
        inputs = self._encode([prompt])
        prefill = self.model(**inputs, use_cache=True)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = self.processor.tokenizer
        label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        width = max(len(ids) for ids in label_ids)
        batch = torch.full((len(labels), width), tokenizer.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(label_ids):
            batch[row, : len(ids)] = torch.tensor(ids)
        batch = batch.to(self.device)
        first = torch.log_softmax(prefill.logits[0, -1].float(), dim=-1)  # scores each label's first token
        cache = getattr(prefill, self._cache_kwarg)
        cache.batch_repeat_interleave(len(labels))
        mask = torch.ones((len(labels), prompt_length + width), dtype=torch.long, device=self.device)
        positions = torch.arange(prompt_length, prompt_length + width, device=self.device).expand(
            len(labels), -1
        )
        rest = self.model(
            input_ids=batch, attention_mask=mask, position_ids=positions, **{self._cache_kwarg: cache}
        )
        logprobs = torch.log_softmax(rest.logits.float(), dim=-1)
        scores = []
        for row, ids in enumerate(label_ids):
            total = first[ids[0]].item()
            total += sum(logprobs[row, k - 1, ids[k]].item() for k in range(1, len(ids)))
            scores.append(total / len(ids))
        return LabelScores(
            log_likelihoods=scores,
            prompt_tokens=int(inputs["attention_mask"][0].sum()),
            image_tokens=int((inputs["input_ids"][0] == self.image_token_id).sum()),
        )


def _checked(results: list[Any], prompts: list[Prompt]) -> list[Any]:
    if len(results) != len(prompts):
        raise RuntimeError(f"runtime returned {len(results)} outputs for {len(prompts)} inputs")
    return results
