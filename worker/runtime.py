"""The LLaVA-NeXT runtime: the only module that imports torch and transformers.

Knows nothing of Celery. Batch-first: lists of prepared inputs in, lists of outputs of the same length out.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StartupError(RuntimeError):
    """The worker cannot serve with these settings (the message says what is missing)."""


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


def resolve_model_source(settings: WorkerSettings) -> str:
    """Hub id or local dir to load; ``tiny:<template>`` is built into ``cache_dir`` on first use."""
    if not settings.model.startswith("tiny:"):
        return settings.model
    from worker import tiny_model

    template = settings.model.removeprefix("tiny:") or "mistral"
    target = settings.cache_dir / f"tiny-{template}"
    if not tiny_model.is_tiny_checkpoint(target):
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tiny-{template}-", dir=settings.cache_dir))
        tiny_model.build(staging, template)
        try:
            os.rename(staging, target)  # atomic: concurrent workers never see half a checkpoint
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        log.info("built tiny %s checkpoint in %s", template, target)
    return str(target)


def resolve_device(settings: WorkerSettings) -> torch.device:
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise StartupError("device=cuda but torch sees no CUDA GPU (check drivers / CUDA_VISIBLE_DEVICES)")
    return torch.device(settings.device)


def resolve_dtype(settings: WorkerSettings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[settings.dtype]


def resolve_attention(settings: WorkerSettings, device: torch.device) -> str:
    if settings.attn_implementation == "auto":
        return "sdpa"
    if settings.attn_implementation == "flash_attention_2":
        if device.type != "cuda":
            raise StartupError(
                "attn_implementation=flash_attention_2 needs a CUDA GPU; this worker runs on cpu"
            )
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise StartupError(
                "attn_implementation=flash_attention_2 needs the flash-attn package (pip install flash-attn)"
            ) from None
    return settings.attn_implementation


class Runtime:
    """LLaVA-NeXT loaded once; ``generate`` and ``score_labels`` serve batches (one at a time)."""

    loads: ClassVar[int] = 0  # how many models this process has loaded (health reports it)

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.device = resolve_device(settings)
        self.dtype = resolve_dtype(settings, self.device)
        self.attention = resolve_attention(settings, self.device)
        self.source = resolve_model_source(settings)
        self._lock = threading.Lock()
        started = time.perf_counter()
        self.processor = LlavaNextProcessor.from_pretrained(self.source)
        self.processor.tokenizer.padding_side = "left"  # batched generation needs left padding
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            self.source, dtype=self.dtype, attn_implementation=self.attention
        ).to(self.device)
        self.model.eval()
        self.load_seconds = time.perf_counter() - started
        self.image_token_id = int(self.model.config.image_token_id)
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
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "load_seconds": round(self.load_seconds, 3),
        }

    def prompt_text(self, text: str) -> str:
        """The full prompt for one image and ``text``, through the checkpoint's chat template."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True))

    def _encode(self, prompts: list[Prompt]) -> Any:
        inputs = self.processor(
            images=[p.image for p in prompts],
            text=[self.prompt_text(p.text) for p in prompts],
            return_tensors="pt",
            padding=True,
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs.to(self.device)

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[Generation]:
        """Generate one answer per prompt (greedy when ``temperature == 0``)."""
        if not prompts:
            return []
        with self._lock, torch.inference_mode():
            inputs = self._encode(prompts)
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
