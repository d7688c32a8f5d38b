"""Classify benchmark: what more labels cost, all labels scored against one prefill of the image's prompt;
what several images' jobs scored together save.

    make bench            (or: python bench/classify.py [--repeats 7] [--images 4])

In-process, on the checkpoint of bench/throughput.py (random weights, the real CLIP 336 px anyres geometry,
a small LM), one 640x480 image: the model's time (``Runtime.score_labels``; the processor runs once, as in
the job's own thread) for exclusive classify with 1 vs 100 labels, and multi-label with 1 vs 10 categories.
Then ``--images`` jobs of images of different sizes, each with its own labels (exclusive and multi-label
alternating; then all exclusive), scored in one call (as one engine step or one static batch does) vs one
call per job. torch runs on ``--threads`` threads (1).
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


def measure(checkpoint: Path, images: list[bytes], repeats: int) -> dict[str, Any]:
    from worker.images import decode_image
    from worker.runtime import Prompt, Runtime, scoring
    from worker.runtime.scoring import LabelQuery
    from worker.settings import WorkerSettings

    runtime = Runtime(WorkerSettings(model=str(checkpoint), device="cpu", dtype="float32"))
    pictures = [decode_image(image, 10**8) for image in images]
    picture = pictures[0]

    def cold(score: Callable[[], Any]) -> Any:
        scoring.candidates.cache_clear()  # each call tokenizes its labels, as a label set's first job does
        return score()

    def job(image: Any, labels: list[str], multi: bool) -> tuple[Any, list[str], Any]:
        if multi:
            text = DEFAULT_LABEL_QUESTION.replace("{label}", max(labels, key=len))
            query = LabelQuery(text, DEFAULT_LABEL_QUESTION)
        else:
            text = f"{DEFAULT_CLASSIFY_PROMPT} Answer with one of: {', '.join(labels)}."
            query = LabelQuery(text)
        return runtime.prepare(Prompt(image, text)), labels, query

    def scored(*jobs: tuple[Any, list[str], Any]) -> Callable[[], Any]:
        items, labels, queries = (list(column) for column in zip(*jobs, strict=True))
        return lambda: cold(lambda: runtime.score_labels(items, labels, queries=queries))

    def exclusive(labels: list[str]) -> Callable[[], Any]:
        return scored(job(picture, labels, multi=False))

    def multi_label(labels: list[str]) -> Callable[[], Any]:
        return scored(job(picture, labels, multi=True))

    mixed = [  # exclusive (10 labels) and multi-label (10 categories) alternating: unlike shapes
        job(image, CATEGORIES if index % 2 else LABELS[10 * index : 10 * index + 10], multi=bool(index % 2))
        for index, image in enumerate(pictures)
    ]
    alike = [
        job(image, LABELS[10 * index : 10 * index + 10], multi=False) for index, image in enumerate(pictures)
    ]

    def one_by_one(jobs: list[tuple[Any, list[str], Any]]) -> Callable[[], Any]:
        runs = [scored(each) for each in jobs]
        return lambda: [run() for run in runs]

    prompt_tokens = runtime.prepare(Prompt(picture, DEFAULT_CLASSIFY_PROMPT)).prompt_tokens
    runs = timed(
        {
            "exclusive_1_ms": exclusive(LABELS[:1]),
            "exclusive_100_ms": exclusive(LABELS),
            "multi_label_1_ms": multi_label(CATEGORIES[:1]),
            "multi_label_10_ms": multi_label(CATEGORIES),
            "mixed_together_ms": scored(*mixed),
            "mixed_one_by_one_ms": one_by_one(mixed),
            "alike_together_ms": scored(*alike),
            "alike_one_by_one_ms": one_by_one(alike),
        },
        repeats,
    )
    return {
        **runs,
        "exclusive_ratio": runs["exclusive_100_ms"] / runs["exclusive_1_ms"],
        "multi_label_ratio": runs["multi_label_10_ms"] / runs["multi_label_1_ms"],
        "mixed_ratio": runs["mixed_together_ms"] / runs["mixed_one_by_one_ms"],
        "alike_ratio": runs["alike_together_ms"] / runs["alike_one_by_one_ms"],
        "images": len(pictures),
        "images_prompt_tokens": {
            "mixed": [item.prompt_tokens for item, _, _ in mixed],
            "alike": [item.prompt_tokens for item, _, _ in alike],
        },
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
    for kind, what in (("mixed", "exclusive and multi-label alternating"), ("alike", "all exclusive")):
        lines.append(
            f"{results['images']} jobs of different images, {what} "
            f"({results['images_prompt_tokens'][kind]} prompt tokens): in one call "
            f"{results[f'{kind}_together_ms']:.1f} ms, one call each "
            f"{results[f'{kind}_one_by_one_ms']:.1f} ms, ratio {results[f'{kind}_ratio']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=4, help="classify jobs of different images at once")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.threads:  # on a few shared cores, two torch threads stall each other (see bench/serving.py)
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    results = measure(checkpoint, make_images(max(1, args.images)), args.repeats)
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
