"""Loading a checkpoint as the settings ask: model source, device, dtype, attention, quantization, template.

Every impossible combination is a :class:`StartupError` naming what is missing: the worker exits at start-up
instead of falling back silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class StartupError(RuntimeError):
    """The worker cannot serve with these settings (the message says what is missing)."""


def resolve_model_source(settings: WorkerSettings) -> str:
    """Hub id or local dir to load. ``tiny:<template>`` (plus optional ``model_overrides``) is a
    random-weight checkpoint built into ``cache_dir`` on first use, then loaded like any other."""
    if not settings.model.startswith("tiny:"):
        if settings.model_overrides:
            raise StartupError(
                "model_overrides (build from a config with random weights) needs model: tiny:<template>"
            )
        return settings.model
    from worker.runtime import tiny_model

    template = settings.model.removeprefix("tiny:") or "mistral"
    if template not in tiny_model.TEMPLATES:
        raise StartupError(
            f"unknown tiny template {template!r}; expected one of {sorted(tiny_model.TEMPLATES)}"
        )
    recipe = json.dumps([tiny_model.BUILD_VERSION, template, settings.model_overrides], sort_keys=True)
    target = settings.cache_dir / f"tiny-{template}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"
    if not tiny_model.is_tiny_checkpoint(target):
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=settings.cache_dir))
        try:
            tiny_model.build(staging, template, overrides=settings.model_overrides)
        except (ValueError, TypeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise StartupError(f"cannot build a model from model_overrides: {exc}") from None
        try:
            os.rename(staging, target)  # atomic: concurrent workers never see half a checkpoint
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
        log.info("built random-weight %s checkpoint in %s", template, target)
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


def flash_attention_missing(device: torch.device) -> str | None:
    """Why FlashAttention-2 cannot run here, or None if it can."""
    if device.type != "cuda":
        return f"a CUDA GPU (this worker runs on {device.type})"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"an Ampere or newer GPU (compute capability >= 8.0; this one is {major}.x)"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash-attn package (pip install flash-attn --no-build-isolation)"
    return None


def resolve_attention(settings: WorkerSettings, device: torch.device) -> str:
    """``auto``: FlashAttention-2 where it can run, else sdpa. An explicit FA2 that cannot run is an error."""
    wanted = settings.attn_implementation
    if wanted in ("auto", "flash_attention_2"):
        missing = flash_attention_missing(device)
        if missing is None:
            return "flash_attention_2"
        if wanted == "flash_attention_2":
            raise StartupError(f"attn_implementation=flash_attention_2 needs {missing}")
        return "sdpa"
    return wanted


def quantization_config(settings: WorkerSettings, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``BitsAndBytesConfig`` for 4/8-bit, or None. bitsandbytes needs a CUDA GPU and its package."""
    if settings.quantization == "none":
        return None
    if device.type != "cuda":
        raise StartupError(
            f"quantization={settings.quantization} needs a CUDA GPU (this worker runs on {device.type})"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise StartupError(f"quantization={settings.quantization} needs the bitsandbytes package") from None
    from transformers import BitsAndBytesConfig

    if settings.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def image_processor_backend() -> str:
    """``torchvision`` (transformers' fast image processor) where torchvision imports, else ``pil``."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # one built for another torch fails to load its operators (RuntimeError)
        log.debug("torchvision does not import (%s): the PIL image processor is used", exc)
        return "pil"
    return "torchvision"


def load_processor(source: str, settings: WorkerSettings, revision: str | None = None) -> LlavaNextProcessor:
    """The checkpoint's processor, left-padding, with its own chat template or the configured family's."""
    from worker.runtime.templates import TEMPLATES

    backend = image_processor_backend()
    processor = LlavaNextProcessor.from_pretrained(source, revision=revision or "main", backend=backend)
    log.info("image processor: %s (%s)", type(processor.image_processor).__name__, backend)
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    if not getattr(processor, "chat_template", None):
        if settings.prompt_family is None:
            raise StartupError(
                f"{source} ships no chat template: set prompt_family (mistral, vicuna, chatml or llama3)"
            )
        processor.chat_template = TEMPLATES[settings.prompt_family].chat_template
        log.info("%s has no chat template: using the %s family's", source, settings.prompt_family)
    return processor


def check_architecture(config: Any) -> None:
    """Refuse configurations LLaVA-NeXT cannot run, before loading weights."""
    vision = config.vision_config
    if config.vision_feature_select_strategy == "full" and vision.model_type == "clip_vision_model":
        per_tile = (vision.image_size // vision.patch_size) ** 2
        raise StartupError(
            "vision_feature_select_strategy='full' keeps CLIP's CLS token, which LLaVA-NeXT's anyres packing "
            f"cannot place ({per_tile + 1} features for a {per_tile}-patch tile): use 'default', or a vision "
            "tower without a CLS token (e.g. SigLIP)"
        )


def is_local_path(model: str) -> bool:
    """Whether ``model`` names a directory rather than a hub id (``name`` or ``namespace/name``)."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or Path(model).exists()


def hub_revision(settings: WorkerSettings, source: str) -> str | None:
    """The revision to ask for: ``model_revision`` for a hub id, nothing for a local directory."""
    return None if Path(source).is_dir() else settings.model_revision


def model_not_found(settings: WorkerSettings, reason: str) -> StartupError:
    """One error that says which checkpoint, from where, and what to do."""
    from huggingface_hub import constants

    model = settings.model
    if is_local_path(model):
        return StartupError(
            f"model directory {model} {reason}. Set LLAVA_MODEL (or model: in the config) to a directory "
            "holding a LLaVA-NeXT checkpoint (config.json, weights, processor files), or to a hub id"
        )
    revision = settings.model_revision or "main"
    offline = "on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "off"
    return StartupError(
        f"cannot load model {model!r} (revision {revision}) from the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} (offline mode {offline}): {reason}. "
        f"Fix: download it first with `hf download {model} --revision {revision}` (HF_TOKEN for gated "
        "checkpoints; HF_HOME moves the cache), or serve a local copy: LLAVA_MODEL=/path/to/checkpoint"
    )


def check_model_source(settings: WorkerSettings) -> None:
    """Refuse a missing directory or a malformed hub id before transformers says something vaguer."""
    if settings.model.startswith("tiny:"):
        return
    if is_local_path(settings.model):
        if not Path(settings.model).expanduser().is_dir():
            raise model_not_found(settings, "does not exist")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(settings.model)
    except HFValidationError as exc:
        raise StartupError(
            f"model {settings.model!r} is neither an existing directory nor a valid hub id ({exc}). Set "
            "LLAVA_MODEL (or model: in the config) to a hub id such as llava-hf/llava-v1.6-mistral-7b-hf, "
            "or to a checkpoint directory"
        ) from None


def load_model(settings: WorkerSettings) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor, str]:
    """Load model and processor as ``settings`` ask; returns (model, processor, source). Weights go straight
    to the target device (``device_map``), never through host memory first."""
    device = resolve_device(settings)
    dtype = resolve_dtype(settings, device)
    attention = resolve_attention(settings, device)
    quantization = quantization_config(settings, device, dtype)
    check_model_source(settings)
    source = resolve_model_source(settings)
    if is_local_path(source):
        source = str(Path(source).expanduser())
    revision = hub_revision(settings, source)
    options: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention, "revision": revision}
    options["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": device}
    if quantization is not None:
        options["quantization_config"] = quantization
    try:
        check_architecture(AutoConfig.from_pretrained(source, revision=revision))
        processor = load_processor(source, settings, revision)
        model = LlavaNextForConditionalGeneration.from_pretrained(source, **options)
    except OSError as exc:
        raise model_not_found(settings, str(exc).strip().splitlines()[0].rstrip(".")) from None
    return model.eval(), processor, source
