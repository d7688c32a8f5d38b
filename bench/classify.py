"""Classify benchmark: what more labels cost, all labels scored against one prefill of the image's prompt.

    make bench            (or: python bench/classify.py [--repeats 7])

In-process, on the checkpoint of bench/throughput.py (random weights, the real CLIP 336 px anyres geometry,
a small LM), one 640x480 image: the model's time (``Runtime.score_labels``; the processor runs once, as in
the job's own thread) for exclusive classify with 1 vs 100 labels, and multi-label with 1 vs 10 categories.
Each call tokenizes its labels (the label cache is cleared: a label set's first job, the worst case).
One warm-up each, then rounds calling each once, interleaved; prints medians and ratios; writes JSON to
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import build_checkpoint, make_images  # noqa: E402
from producer.contract import DEFAULT_CLASSIFY_PROMPT, DEFAULT_LABEL_QUESTION  # noqa: E402

LABELS = [f"{kind} {index}" for index in range(25) for kind in ("cat", "stop sign", "red car", "chart")]
CATEGORIES = ["nudity", "violence", "weapons", "drugs", "gore", "hate symbols", "self-harm", "alcohol"]
CATEGORIES += ["gambling", "smoking"]


def timed(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each run: one warm-up call each, then ``repeats`` rounds calling every run
    once, interleaved (a busy machine slows them alike)."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure(checkpoint: Path, image: bytes, repeats: int) -> dict[str, Any]:
    from worker.images import decode_image
    from worker.runtime import Prompt, Runtime, scoring
    from worker.runtime.scoring import LabelQuery
    from worker.settings import WorkerSettings

    runtime = Runtime(WorkerSettings(model=str(checkpoint), device="cpu", dtype="float32"))
    picture = decode_image(image, 10**8)

    def cold(score: Callable[[], Any]) -> Any:
        scoring.candidates.cache_clear()  # each call tokenizes its labels, as a label set's first job does
        return score()

    def exclusive(labels: list[str]) -> Callable[[], Any]:
        text = f"{DEFAULT_CLASSIFY_PROMPT} Answer with one of: {', '.join(labels)}."
        item, query = runtime.prepare(Prompt(picture, text)), LabelQuery(text)
        return lambda: cold(lambda: runtime.score_labels([item], [labels], queries=[query]))

    def multi_label(labels: list[str]) -> Callable[[], Any]:
        text = DEFAULT_LABEL_QUESTION.replace("{label}", max(labels, key=len))
        item, query = runtime.prepare(Prompt(picture, text)), LabelQuery(text, DEFAULT_LABEL_QUESTION)
        return lambda: cold(lambda: runtime.score_labels([item], [labels], queries=[query]))

    prompt_tokens = runtime.prepare(Prompt(picture, DEFAULT_CLASSIFY_PROMPT)).prompt_tokens
    runs = timed(
        {
            "exclusive_1_ms": exclusive(LABELS[:1]),
            "exclusive_100_ms": exclusive(LABELS),
            "multi_label_1_ms": multi_label(CATEGORIES[:1]),
            "multi_label_10_ms": multi_label(CATEGORIES),
        },
        repeats,
    )
    return {
        **runs,
        "exclusive_ratio": runs["exclusive_100_ms"] / runs["exclusive_1_ms"],
        "multi_label_ratio": runs["multi_label_10_ms"] / runs["multi_label_1_ms"],
        "prompt_tokens": prompt_tokens,
        "repeats": repeats,
    }


def report(results: dict[str, Any]) -> str:
    rows = [
        ("exclusive", "1 label", "100 labels", "exclusive"),
        ("multi-label", "1 category", "10 categories", "multi_label"),
    ]
    lines = [f"prompt: {results['prompt_tokens']} tokens (640x480 image, real 336 px anyres geometry)"]
    for mode, one, many, key in rows:
        few_ms, many_ms = (results[f"{key}_{n}_ms"] for n in ("1", "100" if key == "exclusive" else "10"))
        lines.append(
            f"{mode:<12} {one:<11} {few_ms:8.1f} ms   {many:<14} {many_ms:8.1f} ms   "
            f"ratio {results[f'{key}_ratio']:.2f}x (target <= 2x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    results = measure(checkpoint, make_images(1)[0], args.repeats)
    print(report(results))
    import torch
    import transformers

    results["meta"] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"classify-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
