"""An H100 roofline price for llava-v1.6-mistral-7b steps: ESTIMATES, not measurements.

    python bench/roofline.py [--serving bench/results/serving-*.json] [--prompt-tokens 2350 --new-tokens 100]

Model: every forward pass takes max(FLOPs / peak bf16 FLOP/s, HBM bytes / bandwidth) + a fixed launch
overhead (0 by default: the pure roofline; ``--overhead-ms`` adds, e.g., eager PyTorch's per-step cost).
Shapes are the real checkpoint's (worker/runtime/architectures.py): Mistral-7B LM (hidden 4096, 32 layers,
MLP 14336, 32 query / 8 KV heads of 128, vocab 32064), CLIP ViT-L/14-336 (24 layers, hidden 1024, 577
tokens per 336 px tile). FLOPs: 2 per weight per token, plus attention (QK^T and AV: 4 x heads x head_dim
per query per attended key). Bytes: every weight read once per forward (bf16) plus the KV cache read
(decode) or written (prefill): 2 x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token.

Two uses: (1) the steady state of each scheduler for N identical jobs (640x480 = 2,350 prompt tokens with
5 tiles, 100 new tokens): static batches of ``--static-batch`` vs the continuous engine at ``--rows`` rows;
(2) the step traces that bench/serving.py recorded (static batches, continuous prefills and decode steps)
priced as if the 7B had run them: estimated jobs/s of each scheduler on the same job trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
HBM_BYTES_S = 3.35e12  # H100 SXM, HBM3


@dataclass(frozen=True)
class Shapes:
    layers: int = 32
    hidden: int = 4096
    mlp: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 32064
    vision_params: float = 0.32e9  # CLIP ViT-L/14-336 tower (304 M) + projector (21 M)
    vision_layers: int = 24
    vision_hidden: int = 1024
    tile_tokens: int = 577

    @property
    def lm_params(self) -> float:
        attention = (
            self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
            + self.heads * self.head_dim * self.hidden
        )
        return self.layers * (attention + 3 * self.hidden * self.mlp) + self.vocab * self.hidden  # + lm_head

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def weight_bytes(self) -> float:
        return 2 * (self.lm_params + self.vocab * self.hidden + self.vision_params)


def seconds(flops: float, bytes_: float, overhead: float) -> float:
    return max(flops / PEAK_FLOPS, bytes_ / HBM_BYTES_S) + overhead


def prefill_s(s: Shapes, prompt: int, tiles: int, overhead: float) -> float:
    """One prompt alone: vision tower on its tiles, then the LM over the prompt (causal attention)."""
    vision = (
        tiles * s.tile_tokens * (2 * s.vision_params + 4 * s.vision_layers * s.vision_hidden * s.tile_tokens)
    )
    lm = prompt * 2 * s.lm_params + 4 * s.layers * s.heads * s.head_dim * prompt * prompt / 2
    bytes_ = s.weight_bytes + prompt * s.kv_bytes_per_token
    return seconds(vision + lm, bytes_, overhead)


def decode_s(s: Shapes, rows: int, kv_tokens: int, overhead: float) -> float:
    """One decode step: ``rows`` new tokens attending ``kv_tokens`` cached positions in all."""
    flops = rows * 2 * s.lm_params + 4 * s.layers * s.heads * s.head_dim * kv_tokens
    return seconds(flops, s.weight_bytes + kv_tokens * s.kv_bytes_per_token, overhead)


def tiles_for(prompt: int) -> int:
    """336 px anyres: 5 tiles (base + 2x2) for the 2,000-3,000-token images, 3 for the ~1,200 ones."""
    return 5 if prompt > 1800 else 3


def steady_state(
    s: Shapes, prompt: int, new: int, static_batch: int, rows: int, overhead: float
) -> dict[str, float]:
    """Images/s for identical jobs: static batches run prefills then ``new`` steps at full batch; the
    continuous engine keeps ``rows`` rows decoding, each job paying its prefill and 1/rows of each step."""
    prefill = prefill_s(s, prompt, tiles_for(prompt), overhead)
    static = static_batch * prefill + sum(
        decode_s(s, static_batch, static_batch * (prompt + t), overhead) for t in range(new)
    )
    step = decode_s(s, rows, rows * (prompt + new // 2), overhead)  # rows at every stage of their lives
    continuous = prefill + new * step / rows
    return {
        "static_img_s": static_batch / static,
        "continuous_img_s": 1 / continuous,
        "prefill_ms": prefill * 1000,
        "decode_step_ms_static": decode_s(s, static_batch, static_batch * (prompt + new // 2), overhead)
        * 1000,
        "decode_step_ms_continuous": step * 1000,
    }


def price_trace(s: Shapes, result: dict[str, Any], overhead: float) -> float:
    """Seconds the 7B would spend on one scheduler's recorded trace (model time only)."""
    trace = result["trace"]
    total = 0.0
    for batch in trace["batches"]:  # static: each prompt prefilled alone, then decode steps at full batch
        rows, steps, prompt = batch["rows"], batch["steps"], batch["sum_prompt"] // batch["rows"]
        total += rows * prefill_s(s, prompt, tiles_for(prompt), overhead)
        total += sum(decode_s(s, rows, rows * (batch["prompt"] + t), overhead) for t in range(steps))
    for step in trace["steps"]:  # continuous: prefills and decode steps (width x rows: the padded cache)
        if "prefill" in step:
            total += prefill_s(s, step["prefill"], tiles_for(step["prefill"]), overhead)
        else:
            total += decode_s(s, step["rows"], step["rows"] * step["width"], overhead)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving", type=Path, help="a bench/serving.py JSON whose traces to price")
    parser.add_argument("--prompt-tokens", type=int, default=2350, help="640x480 image + prompt")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--static-batch", type=int, default=8, help="max_batch_size of the 7B config")
    parser.add_argument("--rows", type=int, default=64, help="continuous rows (max_running_rows)")
    parser.add_argument("--overhead-ms", type=float, default=0.0, help="fixed cost per forward pass")
    args = parser.parse_args(argv)
    s, overhead = Shapes(), args.overhead_ms / 1000
    state = steady_state(s, args.prompt_tokens, args.new_tokens, args.static_batch, args.rows, overhead)
    print(
        f"ESTIMATE (H100 roofline, overhead {args.overhead_ms:g} ms/forward), llava-v1.6-mistral-7b, "
        f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens:"
    )
    print(
        f"  prefill {state['prefill_ms']:.0f} ms/image; decode step {state['decode_step_ms_static']:.1f} ms "
        f"(static, {args.static_batch} rows) / {state['decode_step_ms_continuous']:.1f} ms "
        f"(continuous, {args.rows} rows)"
    )
    print(
        f"  static {state['static_img_s']:.1f} img/s, continuous {state['continuous_img_s']:.1f} img/s "
        f"({state['continuous_img_s'] / state['static_img_s']:.2f}x)"
    )
    out: dict[str, Any] = {"estimate": True, "overhead_ms": args.overhead_ms, "steady_state": state}
    if args.serving:
        serving = json.loads(args.serving.read_text())
        jobs = int(serving["meta"]["args"]["jobs"])
        for name in ("static", "continuous"):
            if name in serving:
                model_s = price_trace(s, serving[name], overhead)
                out[f"{name}_trace"] = {"model_s": model_s, "jobs_per_s": jobs / model_s}
                print(
                    f"  {name}'s own trace of the serving run ({jobs} jobs, last repetition) on the 7B: "
                    f"{model_s:.2f} s of model time, {jobs / model_s:.1f} jobs/s"
                )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
