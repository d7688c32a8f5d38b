"""Prefix-cache benchmark: several jobs on the same image (a caption and two questions), cache on vs off.

    make bench            (or: python bench/prefix.py [--images 4] [--repeats 3])

In-process, on the checkpoint of bench/throughput.py (random weights, the real CLIP 336 px anyres geometry,
a small LM), 640x480-class images: for each image a caption (24 new tokens) and two VQA jobs (12 each), all
submitted at once to the continuous engine (``ContinuousEngine`` over ``RuntimeSteps``; the processor runs
beforehand, as in the jobs' own threads). Variants: ``prefix_cache_tokens`` 0 (off) and on; the same
prepared jobs, one warm-up run each, then ``--repeats`` runs each, interleaved; medians of the wall time
for all jobs, of the job latencies, and the prompt tokens actually prefilled; checks that both variants give
the same greedy tokens. torch on 1 thread (as bench/serving.py). Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import build_checkpoint, make_images  # noqa: E402
from producer.contract import DEFAULT_CAPTION_PROMPT  # noqa: E402

JOBS = [(DEFAULT_CAPTION_PROMPT, 24), ("What is shown in this image?", 12), ("Which colours do you see?", 12)]


@dataclass(frozen=True, eq=False)
class _Item:
    prepared: Any


def _counting_steps(runtime: Any, prefix_tokens: int) -> Any:
    from worker.faults import Faults
    from worker.steps import RuntimeSteps

    class Counting(RuntimeSteps):
        """The real steps, counting the prompt tokens the model prefilled (a prefix hit skips some)."""

        prefilled = 0

        def prefill(self, row_id: int, tokens: int) -> int:
            pending = self._pending[row_id][0]
            before = pending.done if pending.embeds is not None else None
            left = super().prefill(row_id, tokens)
            start = before if before is not None else pending.start
            self.prefilled += pending.prepared.prompt_tokens - left - start
            return left

    faults = Faults.from_settings(runtime.settings)
    return Counting(runtime, faults, classify=lambda item: None, prefix_tokens=prefix_tokens)


def run_once(runtime: Any, items: list[tuple[Any, int]], prefix_tokens: int) -> dict[str, Any]:
    from worker.batching import BatchKey
    from worker.engine import ContinuousEngine
    from worker.runtime import Sampling

    steps = _counting_steps(runtime, prefix_tokens)
    engine = ContinuousEngine(steps, 200_000, 64, runtime.settings.max_prefill_tokens).start()
    try:
        started = time.perf_counter()
        futures = [
            engine.submit(BatchKey(Sampling(max_new_tokens=n)), _Item(p), timeout=600) for p, n in items
        ]
        finished: dict[int, float] = {}
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, i=index: finished.setdefault(i, time.perf_counter()))
        answers = [future.result(600).output.text for future in futures]
        wall = time.perf_counter() - started
        latencies = [finished[index] - started for index in range(len(futures))]
    finally:
        engine.stop()
    return {
        "wall_s": wall,
        "latency_p50_s": statistics.median(latencies),
        "prefilled_tokens": steps.prefilled,
        "hits": steps.prefix.hits,
        "answers": answers,
    }


def measure(checkpoint: Path, images: int, repeats: int, prefix_tokens: int) -> dict[str, Any]:
    import torch

    from worker.images import decode_image
    from worker.runtime import Prompt, Runtime
    from worker.settings import WorkerSettings

    torch.set_num_threads(1)
    settings = WorkerSettings(model=str(checkpoint), device="cpu", dtype="float32")
    runtime = Runtime(settings.model_copy(update={"prefix_cache_tokens": prefix_tokens}))
    pictures = [decode_image(data, 10**8) for data in make_images(images)]
    items = [(runtime.prepare(Prompt(p, text)), n) for p in pictures for text, n in JOBS]
    variants = {"off": 0, "on": prefix_tokens}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for tokens in variants.values():  # warm-up
        run_once(runtime, items, tokens)
    for _ in range(repeats):
        for name, tokens in variants.items():
            runs[name].append(run_once(runtime, items, tokens))
    same = all(run["answers"] == runs["off"][0]["answers"] for name in runs for run in runs[name])
    results: dict[str, Any] = {
        name: {
            key: statistics.median(run[key] for run in done)
            for key in ("wall_s", "latency_p50_s", "prefilled_tokens", "hits")
        }
        | {"wall_s_runs": [round(run["wall_s"], 3) for run in done]}
        for name, done in runs.items()
    }
    prompt_tokens = [p.prompt_tokens for p, _ in items]
    return results | {
        "speedup": results["off"]["wall_s"] / results["on"]["wall_s"],
        "same_answers": same,
        "jobs": len(items),
        "images": images,
        "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
        "prefix_cache_tokens": prefix_tokens,
        "max_prefill_tokens": runtime.settings.max_prefill_tokens,
        "repeats": repeats,
    }


def report(results: dict[str, Any]) -> str:
    off, on = results["off"], results["on"]
    lines = [
        f"{results['jobs']} jobs: {results['images']} images x (caption, VQA, VQA), all submitted at once; "
        f"prompts {results['prompt_tokens'][0]}-{results['prompt_tokens'][1]} tokens",
        f"{'median of ' + str(results['repeats']):<24} {'prefix cache off':>18} {'prefix cache on':>18}",
        f"{'wall time, s':<24} {off['wall_s']:>18.2f} {on['wall_s']:>18.2f}   {results['speedup']:.2f}x",
        f"{'job latency p50, s':<24} {off['latency_p50_s']:>18.2f} {on['latency_p50_s']:>18.2f}",
        f"{'prompt tokens prefilled':<24} {off['prefilled_tokens']:>18.0f} {on['prefilled_tokens']:>18.0f}",
        f"{'prefix hits':<24} {off['hits']:>18.0f} {on['hits']:>18.0f}",
        f"same greedy answers: {results['same_answers']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefix-cache-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    results = measure(checkpoint, args.images, args.repeats, args.prefix_cache_tokens)
    print(report(results))
    import torch
    import transformers

    results["meta"] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
