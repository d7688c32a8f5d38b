"""The llava-hf LLaVA-NeXT checkpoints' architectures, at full size, without their weights.

Used to size deployments (parameters, weight memory at bf16/fp16 and 4-bit: the README's checkpoint table)
and to build a full-size model with random weights for GPU speed and memory checks, no download needed:

    python -m worker.runtime.architectures --table
    python -m worker.runtime.architectures --build mistral-7b --out /tmp/llava-7b-random   (needs ~15 GB disk)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

# CLIP ViT-L/14 at 336 px: the vision tower of every llava-v1.6 checkpoint, and its anyres grid (also the
# tiny checkpoints' "real" geometry).
CLIP_IMAGE_SIZE, CLIP_PATCH_SIZE = 336, 14
PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_CLIP_L_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": CLIP_IMAGE_SIZE,
    "patch_size": CLIP_PATCH_SIZE,
    "projection_dim": 768,
}


@dataclass(frozen=True)
class Checkpoint:
    name: str
    config_file: str
    family: str
    text_config: dict[str, Any]
    image_token_index: int

    def llava_config(self) -> LlavaNextConfig:
        from transformers import AutoConfig

        text = dict(self.text_config)
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**_CLIP_L_336),
            text_config=AutoConfig.for_model(text.pop("model_type"), **text),
            image_token_index=self.image_token_index,
            image_grid_pinpoints=[list(p) for p in PINPOINTS],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )


def _llama(
    hidden: int, intermediate: int, layers: int, heads: int, kv: int, vocab: int, positions: int
) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": positions,
    }


CHECKPOINTS = {
    c.name: c
    for c in (
        Checkpoint(
            "mistral-7b",
            "llava-v1.6-mistral-7b.yaml",
            "mistral",
            {**_llama(4096, 14336, 32, 32, 8, 32064, 32768), "model_type": "mistral"},
            32000,
        ),
        Checkpoint(
            "vicuna-7b",
            "llava-v1.6-vicuna-7b.yaml",
            "vicuna",
            _llama(4096, 11008, 32, 32, 32, 32064, 4096),
            32000,
        ),
        Checkpoint(
            "vicuna-13b",
            "llava-v1.6-vicuna-13b.yaml",
            "vicuna",
            _llama(5120, 13824, 40, 40, 40, 32064, 4096),
            32000,
        ),
        Checkpoint(
            "34b", "llava-v1.6-34b.yaml", "chatml", _llama(7168, 20480, 60, 56, 8, 64064, 4096), 64000
        ),
        Checkpoint(
            "llama3-8b",
            "llama3-llava-next-8b.yaml",
            "llama3",
            _llama(4096, 14336, 32, 32, 8, 128320, 8192),
            128256,
        ),
    )
}
_GPUS_GB = (16, 24, 40, 48, 80)


@dataclass(frozen=True)
class Footprint:
    parameters: int
    bf16_gb: float
    int4_gb: float


def footprint(checkpoint: Checkpoint) -> Footprint:
    """Parameters and weight memory, from the architecture built on the meta device (no allocation).

    4-bit: bitsandbytes NF4 on every ``nn.Linear`` except ``lm_head`` (0.5 byte per weight + one fp32 absmax
    per 64-weight block); everything else stays 16-bit.
    """
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(checkpoint.llava_config())
    total = sum(p.numel() for p in model.parameters())
    quantized = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    )
    return Footprint(total, total * 2 / 1e9, (quantized * (0.5 + 4 / 64) + (total - quantized) * 2) / 1e9)


def recommended_gpu(weights_gb: float) -> str:
    """The smallest common GPU holding the weights plus 6 GB for activations and the KV cache of a batch of
    a few ~3k-token prompts (e.g. 34b: 245 KB of KV per token, 12k tokens in flight = 3 GB)."""
    need = weights_gb + 6
    return next((f"{gb} GB" for gb in _GPUS_GB if gb >= need), f"{need:.0f} GB: split across GPUs")


def table() -> str:
    """The README's checkpoint table (markdown)."""
    header = (
        "| Config file | Checkpoint | Prompt family | Parameters | Weights bf16/fp16 | Weights 4-bit "
        "| GPU bf16 | GPU 4-bit |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for c in CHECKPOINTS.values():
        f = footprint(c)
        gpus = f"{recommended_gpu(f.bf16_gb)} | {recommended_gpu(f.int4_gb)}"
        rows.append(
            f"| `configs/{c.config_file}` | {c.name} | {c.family} | {f.parameters / 1e9:.2f} B | "
            f"{f.bf16_gb:.1f} GB | {f.int4_gb:.1f} GB | {gpus} |"
        )
    return "\n".join(rows)


def build_random(name: str, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save the full-size ``name`` architecture with random weights (for GPU speed/memory checks)."""
    from worker.runtime.templates import TEMPLATES
    from worker.runtime.tiny_model import build_processor, build_tokenizer

    checkpoint = CHECKPOINTS[name]
    config = checkpoint.llava_config()
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)  # built in dtype: less memory
    model.save_pretrained(out)
    tokenizer = build_tokenizer(TEMPLATES[checkpoint.family])
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    model.config.image_token_index = config.image_token_index
    model.config.save_pretrained(out)
    build_processor(tokenizer, TEMPLATES[checkpoint.family], config).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.runtime.architectures", description=__doc__)
    parser.add_argument("--table", action="store_true", help="print the README's checkpoint table")
    parser.add_argument(
        "--build", choices=sorted(CHECKPOINTS), help="save this architecture with random weights"
    )
    parser.add_argument("--out", type=Path, help="directory for --build")
    args = parser.parse_args(argv)
    if args.build:
        if args.out is None:
            parser.error("--build needs --out")
        print(build_random(args.build, args.out))
    if args.table or not args.build:
        print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
