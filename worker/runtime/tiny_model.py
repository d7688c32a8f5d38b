"""Build a tiny, real LLaVA-NeXT checkpoint (random weights) for tests, the demo and benchmarks.

The output is a genuine Hugging Face checkpoint directory: ``config.json`` + ``model.safetensors`` for
``LlavaNextForConditionalGeneration``, a byte-level BPE tokenizer trained here with ``tokenizers``, the
LLaVA-NeXT image processor config and the family's chat template, so that
``LlavaNextForConditionalGeneration.from_pretrained(DIR)`` and ``LlavaNextProcessor.from_pretrained(DIR)``
load it exactly as they load a llava-hf checkpoint. Everything is seeded: the same command writes the same
weights and tokenizer.

Usage: ``python -m worker.tiny_model --out DIR [--template mistral|vicuna|chatml|llama3]
[--geometry tiny|real]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.runtime.architectures import CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE, PINPOINTS
from worker.runtime.templates import TEMPLATES, Template

log = logging.getLogger(__name__)

SEED = 1234
BUILD_VERSION = 2  # bump when the builder's output changes: cached checkpoints are rebuilt
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class Geometry:
    """The vision side's tiling: tile size, patch size and the anyres grid pinpoints."""

    image_size: int
    patch_size: int
    pinpoints: tuple[tuple[int, int], ...]


GEOMETRIES = {
    # 32 px tiles of 8 px patches: 16 patches + CLS per tile; fast enough for every test.
    "tiny": Geometry(32, 8, ((32, 32), (32, 64), (64, 32), (64, 64))),
    # The real llava-v1.6 geometry: CLIP 336 px / 14 px patches, anyres up to 1008 px (1,176-2,928 tokens).
    "real": Geometry(CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE, PINPOINTS),
}

_CORPUS_WORDS = (
    "what is shown in this image classify the object describe picture photo question answer a an of on in "
    "with and or to is are sign stop red white street road car cat dog bird chart radar graph logo text "
    "transparent background blue green yellow black person people tree sky house building yes no safe "
    "nsfw violence animal vehicle food plant number one two three left right top bottom colour color "
    "the image shows there it this that which where how many does say word letters say"
).split()


def _corpus(template: Template) -> list[str]:
    words = _CORPUS_WORDS
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 5)]
    lines += [w.capitalize() + "?" for w in words]
    lines += [template.system_prompt] if template.system_prompt else []
    return lines * 4


def build_tokenizer(template: Template):  # -> PreTrainedTokenizerFast
    """Train a small byte-level BPE tokenizer holding the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = list(
        dict.fromkeys([*template.special_tokens.values(), *template.extra_special_tokens, "<image>"])
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(special),
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(template), trainer=trainer)
    if template.add_bos:
        bos = template.special_tokens["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=4096,
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
        **template.special_tokens,
    )
    fast.add_special_tokens({"additional_special_tokens": [t for t in template.extra_special_tokens]})
    return fast


def build_config(
    tokenizer, geometry: Geometry, overrides: dict[str, Any] | None = None
):  # -> LlavaNextConfig
    """A LLaVA-NeXT config with the real architecture at toy sizes (CLIP vision tower, Llama-style LM).

    ``overrides`` holds LlavaNextConfig fields; its ``vision_config`` / ``text_config`` dicts are merged into
    the toy ones (``text_config.model_type`` picks the LM family, default llama).
    """
    from transformers import AutoConfig, CLIPVisionConfig, LlavaNextConfig

    overrides = dict(overrides or {})
    vision = _toy_vision(geometry, overrides.pop("vision_config", {}))
    text = _toy_text(tokenizer, overrides.pop("text_config", {}))
    if text["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"text_config.vocab_size {text['vocab_size']} is below the tokenizer's {len(tokenizer)}"
        )
    top = {
        "image_grid_pinpoints": [list(p) for p in geometry.pinpoints],
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        **overrides,
    }
    vision_config = CLIPVisionConfig(**vision)
    return LlavaNextConfig(
        vision_config=vision_config,
        text_config=AutoConfig.for_model(text.pop("model_type"), **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        **top,
    )


def _toy_vision(geometry: Geometry, overrides: dict[str, Any]) -> dict[str, Any]:
    """The CLIP vision tower's fields at toy sizes, with the checkpoint's geometry and ``overrides``."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": geometry.image_size,
        "patch_size": geometry.patch_size,
        "projection_dim": 32,
        **overrides,
    }


def _toy_text(tokenizer, overrides: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields at toy sizes (Llama unless ``overrides`` names another ``model_type``)."""
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }


def build_processor(tokenizer, template: Template, config):  # -> LlavaNextProcessor
    """The LLaVA-NeXT processor matching ``config``'s vision geometry, with the family's chat template."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    # CLIP adds a CLS token: without num_additional_image_tokens=1 every image is off by one token.
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template.chat_template,
    )


def build(
    out: Path, template_name: str = "mistral", geometry: str = "tiny", overrides: dict[str, Any] | None = None
) -> Path:
    """Write a random-weight checkpoint for ``template_name`` into ``out`` and return ``out``."""
    import torch
    from transformers import GenerationConfig, LlavaNextForConditionalGeneration

    template = TEMPLATES[template_name]
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer(template)
    config = build_config(tokenizer, GEOMETRIES[geometry], overrides)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tokenizer, template, config).save_pretrained(out)
    marker = {"template": template_name, "geometry": geometry, "overrides": overrides or {}, "seed": SEED}
    (out / "llava_queue_tiny.json").write_text(json.dumps(marker) + "\n")
    return out


def is_tiny_checkpoint(path: Path) -> bool:
    """True if ``path`` holds a complete checkpoint written by :func:`build`."""
    return (path / "llava_queue_tiny.json").is_file() and (path / "model.safetensors").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="mistral", help="prompt family")
    parser.add_argument(
        "--geometry",
        choices=sorted(GEOMETRIES),
        default="tiny",
        help="tiny: 32 px tiles; real: CLIP 336 px anyres",
    )
    args = parser.parse_args(argv)
    build(args.out, args.template, args.geometry)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    what = f"{args.template}, {args.geometry} geometry, {size / 1024:.0f} KiB"
    print(f"wrote tiny LLaVA-NeXT checkpoint ({what}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
