"""The serving scenario on a CUDA GPU with the full-size llava-v1.6-mistral-7b architecture (random weights,
built from its config: no download), static batcher vs continuous engine, side by side:

    python bench/gpu.py [--jobs 96] [--rate 20] [--new-tokens 100] [--out bench/results]

Caption jobs on 640x480 images (2,350 prompt tokens at the 336 px anyres geometry), ``--new-tokens`` each,
Poisson arrivals at ``--rate``; prints img/s, p50/p95 latency, prefill and decode step times and peak GPU
memory per scheduler; writes JSON under bench/results/. Needs a CUDA GPU with ~40 GB free and ~15 GB of
disk for the random checkpoint (``--checkpoint``, built once). Without CUDA it refuses and says so.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import random
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import Job, variant  # noqa: E402
from bench.throughput import median  # noqa: E402
from producer.contract import TASK_CAPTION  # noqa: E402


def image_640x480() -> bytes:
    from PIL import Image

    rng = random.Random(0)
    image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def step_times(trace: dict[str, Any]) -> dict[str, float]:
    prefills = [s["ms"] for s in trace["steps"] if "prefill" in s]
    decodes = [s["ms"] for s in trace["steps"] if "rows" in s]
    rows = [s["rows"] for s in trace["steps"] if "rows" in s]
    return {
        "prefill_ms_median": median(prefills),
        "decode_step_ms_median": median(decodes),
        "rows_median": median(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=96)
    parser.add_argument("--rate", type=float, default=20.0, help="offered jobs per second")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llava-v1.6-mistral-7b-random"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run.")
        return 2
    from worker.runtime.architectures import build_random

    if not (args.checkpoint / "config.json").exists():
        print(f"building the full-size architecture with random weights in {args.checkpoint} ...", flush=True)
        build_random("mistral-7b", args.checkpoint)
    data = [image_640x480()]
    uris = ["data:image/png;base64," + base64.b64encode(data[0]).decode()]
    rng = random.Random(0)
    jobs, clock = [], 0.0
    for _ in range(args.jobs):
        clock += rng.expovariate(args.rate)
        jobs.append(Job(clock, TASK_CAPTION, 0, args.new_tokens))
    warm = [Job(0.0, TASK_CAPTION, 0, 8) for _ in range(4)]
    settings = {"device": "cuda", "dtype": "bfloat16", "attn_implementation": "auto", "max_batch_size": 8}
    results: dict[str, Any] = {}
    for name in ("static", "continuous"):
        torch.cuda.reset_peak_memory_stats()
        result = variant(
            name, args.checkpoint, jobs, warm, data, uris, args.repeats, **settings, concurrency=256
        )
        result |= step_times(result["trace"]) | {"peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        results[name] = result
        print(
            f"{name:>10}: {result['jobs_per_s']:.2f} img/s, caption p50 {result['caption_p50_s']:.2f} s "
            f"p95 {result['caption_p95_s']:.2f} s, prefill {result['prefill_ms_median']:.0f} ms, decode step "
            f"{result['decode_step_ms_median']:.1f} ms at {result['rows_median']:.0f} rows, "
            f"peak {result['peak_gb']:.1f} GB",
            flush=True,
        )
        gc.collect()  # the variant's model goes before the next one loads
        torch.cuda.empty_cache()
    meta = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
