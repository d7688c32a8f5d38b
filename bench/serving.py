"""Serving scenario: the seed's loop vs the static batcher vs the continuous engine, side by side in one run.

    python bench/serving.py [--quick] [--jobs 48] [--rate 12] [--moderate-rate 0] [--repeats 3]

Poisson arrivals of a mix of caption (max_new_tokens 16-96), VQA (8-48) and classify (2-20 labels) jobs on
mixed image sizes, on a random-weight LLaVA-NeXT with the real CLIP 336 px anyres geometry and a small LM (as
bench/throughput.py), in two runs: the *capacity* run offers ``--rate`` (above what a CPU serves: throughput
is capacity, latency is mostly backlog), the *moderate* run offers ``--moderate-rate`` (default: half the
static batcher's throughput in the capacity run), where latency is the jobs' own. A variant named
``NAME+pool`` is NAME with the preprocessing pool (``--pool-workers`` processes); the others run the processor
in the job's thread. Each variant loads the model in this process, gets the same warm-up and the same
repetitions of the same arrival schedule; the figures are medians over repetitions:
throughput, p50/p95 latency per kind (arrival to result), token-slot utilisation (useful generated tokens /
row positions that produced a token), model forward passes per job. Static and continuous go through
``Service.run`` (image decode, processor, model thread: the worker minus Celery); the seed loop is the
seed's example 1 (processor, then ``generate``, one job at a time, in arrival order). The continuous run's
step trace and the static run's batch trace go to the JSON for bench/roofline.py.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import build_checkpoint, make_images, median  # noqa: E402
from producer.contract import TASK_CAPTION, TASK_CLASSIFY, TASK_VQA  # noqa: E402

WORDS = ["cat", "dog", "car", "stop sign", "chart", "logo", "person", "tree", "building", "food", "boat"]
WORDS += ["bird", "plane", "train", "bus", "flower", "map", "text", "face", "sky", "road", "river"]
KIND_OF_TASK = {TASK_CAPTION: "caption", TASK_VQA: "vqa", TASK_CLASSIFY: "classify"}


@dataclass(frozen=True)
class Job:
    arrival: float  # seconds after the run's start
    task: str
    image: int
    max_new_tokens: int = 0
    labels: tuple[str, ...] = ()

    def request(self, images: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"image": images[self.image]}
        if self.task == TASK_CLASSIFY:
            return body | {"labels": list(self.labels)}
        if self.task == TASK_VQA:
            body["question"] = "What is written on the sign, and what colour is it?"
        return body | {"generation": {"max_new_tokens": self.max_new_tokens}}


def workload(count: int, rate: float, images: int, seed: int = 0) -> list[Job]:
    """``count`` jobs with exponential gaps (Poisson arrivals at ``rate`` jobs/s): 50% caption,
    25% VQA, 25% classify."""
    rng = random.Random(seed)
    jobs, clock = [], 0.0
    for index in range(count):
        clock += rng.expovariate(rate)
        draw = rng.random()
        if draw < 0.5:
            jobs.append(Job(clock, TASK_CAPTION, index % images, rng.randint(16, 96)))
        elif draw < 0.75:
            jobs.append(Job(clock, TASK_VQA, index % images, rng.randint(8, 48)))
        else:
            jobs.append(
                Job(clock, TASK_CLASSIFY, index % images, labels=tuple(rng.sample(WORDS, rng.randint(2, 20))))
            )
    return jobs


class Meter:
    """Counts the model's forward passes and the row positions that produced a generated token."""

    def __init__(self, runtime: Any) -> None:
        self.forwards = 0
        self.slots = 0
        self.steps: list[dict[str, int]] = []  # continuous: one entry per prefill or decode step
        self.batches: list[dict[str, int]] = []  # static: one entry per batch
        runtime.model.register_forward_pre_hook(self._count)
        self._wrap(runtime)

    def _count(self, *_: Any) -> None:
        self.forwards += 1

    def _wrap(self, runtime: Any) -> None:
        generate, prefill_chunk, decode_step = runtime.generate, runtime.prefill_chunk, runtime.decode_step
        prefilling: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()  # ms so far

        def static_generate(batch: Any, sampling: Any, *args: Any, **kwargs: Any) -> Any:
            outputs = generate(batch, sampling, *args, **kwargs)
            lengths = [getattr(o, "generated_tokens", sampling.max_new_tokens) for o in outputs]
            self.slots += len(batch) * max(lengths)  # every row computes until the longest ends
            prompts = [p.prompt_tokens for p in batch]
            self.batches.append(
                {
                    "rows": len(batch),
                    "steps": max(lengths),
                    "prompt": max(prompts),
                    "sum_prompt": sum(prompts),
                }
            )
            return outputs

        def engine_prefill(pending: Any, tokens: int, prefix: Any = None) -> Any:
            started = time.perf_counter()
            done = prefill_chunk(pending, tokens, prefix)
            prefilling[pending] = prefilling.get(pending, 0.0) + _ms_since(started)
            if done is not None:  # one trace entry per prompt, its chunks' time summed
                self.slots += 1
                self.steps.append({"prefill": pending.prepared.prompt_tokens, "ms": prefilling.pop(pending)})
            return done

        def engine_step(batch: Any) -> None:
            self.slots += len(batch.rows)
            entry = {"rows": len(batch.rows), "kv": sum(r.length for r in batch.rows), "width": batch.width}
            started = time.perf_counter()
            decode_step(batch)
            self.steps.append({**entry, "ms": _ms_since(started)})

        runtime.generate, runtime.prefill_chunk, runtime.decode_step = (
            static_generate,
            engine_prefill,
            engine_step,
        )


def _ms_since(started: float) -> float:
    """Milliseconds since ``started`` (after the device has finished the work queued so far)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1000, 3)


def run_service(service: Any, jobs: list[Job], images: list[str]) -> list[dict[str, Any]]:
    """Each job on its own thread at its arrival time, through ``Service.run``; arrival-to-result times."""
    from worker.service import JobContext

    records: list[dict[str, Any]] = [{} for _ in jobs]
    start = time.perf_counter() + 0.05

    def one(index: int, job: Job) -> None:
        time.sleep(max(0.0, start + job.arrival - time.perf_counter()))
        result = service.run(job.task, job.request(images), JobContext(f"bench-{index}", "bench"))
        done = time.perf_counter() - start
        records[index] = {
            "kind": KIND_OF_TASK[job.task],
            "latency": done - job.arrival,
            "done": done,
            "tokens": result["generated_tokens"],
        }

    threads = [threading.Thread(target=one, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return records


def run_seed(runtime: Any, meter: Meter, jobs: list[Job], images: list[bytes]) -> list[dict[str, Any]]:
    """The seed's loop on the same arrivals: one job at a time, processor then generate (or label scoring)."""
    import torch

    from worker.images import decode_image
    from worker.runtime import Prompt
    from worker.runtime.scoring import LabelQuery

    records, start = [], time.perf_counter()
    for job in jobs:
        time.sleep(max(0.0, start + job.arrival - time.perf_counter()))
        picture = decode_image(images[job.image], 10**8)
        if job.task == TASK_CLASSIFY:
            text = f"Classify the image. Answer with one of: {', '.join(job.labels)}."
            prepared, query = runtime.prepare(Prompt(picture, text)), LabelQuery(text)
            runtime.score_labels([prepared], [list(job.labels)], queries=[query])
            tokens = 0
        else:
            prepared = runtime.prepare(Prompt(picture, "Describe the image."))
            with torch.inference_mode():
                output = runtime.model.generate(
                    **runtime.collate([prepared]), max_new_tokens=job.max_new_tokens, do_sample=False
                )
            tokens = runtime._generated_length(output[0, prepared.prompt_tokens :].tolist())
            meter.slots += tokens
        done = time.perf_counter() - start
        records.append(
            {"kind": KIND_OF_TASK[job.task], "latency": done - job.arrival, "done": done, "tokens": tokens}
        )
    return records


def summary(records: list[dict[str, Any]], jobs: list[Job], forwards: int, slots: int) -> dict[str, Any]:
    wall = max(r["done"] for r in records) - min(job.arrival for job in jobs)
    out: dict[str, Any] = {"jobs_per_s": len(records) / wall, "wall_s": wall}
    for kind in ("caption", "vqa", "classify"):
        latencies = sorted(r["latency"] for r in records if r["kind"] == kind)
        if latencies:
            out[f"{kind}_p50_s"] = statistics.median(latencies)
            out[f"{kind}_p95_s"] = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    useful = sum(r["tokens"] for r in records)
    out["useful_tokens"] = useful
    out["utilisation"] = useful / slots if slots else 1.0
    out["forwards_per_job"] = forwards / len(records)
    return out


def variant(
    name: str,
    checkpoint: Path,
    jobs: list[Job],
    warm: list[Job],
    data: list[bytes],
    uris: list[str],
    repeats: int,
    pool_workers: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Load, warm up, run ``repeats`` times; medians of every figure. ``overrides``: worker settings.
    ``name``: seed, static or continuous, ``+pool`` for the preprocessing pool."""
    from worker.service import Service
    from worker.settings import WorkerSettings

    base, _, pool = name.partition("+")
    options: dict[str, Any] = {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}
    settings = WorkerSettings(
        **options
        | {
            "model": str(checkpoint),
            "scheduler": "static" if base == "static" else "continuous",
            "preprocess_workers": pool_workers if pool else 0,
            "max_new_tokens_cap": 4096,
            "concurrency": 64,
            "loglevel": "WARNING",
        }
        | overrides
    )
    service = Service(settings)
    runtime = service.start()
    meter = Meter(runtime)
    execute: Callable[[list[Job]], list[dict[str, Any]]]
    if base == "seed":
        execute = lambda batch: run_seed(runtime, meter, batch, data)  # noqa: E731
    else:
        execute = lambda batch: run_service(service, batch, uris)  # noqa: E731
    try:
        execute(warm)
        runs = []
        for _ in range(repeats):
            before = (meter.forwards, meter.slots)
            meter.steps.clear()
            meter.batches.clear()
            records = execute(jobs)
            runs.append(summary(records, jobs, meter.forwards - before[0], meter.slots - before[1]))
    finally:
        service.stop()
    figures = {key: median([run[key] for run in runs]) for key in runs[0]}
    return {**figures, "runs": runs, "trace": {"steps": list(meter.steps), "batches": list(meter.batches)}}


def report(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    rows = [
        ("jobs/s", "jobs_per_s", "{:.2f}"),
        ("utilisation", "utilisation", "{:.0%}"),
        ("forwards/job", "forwards_per_job", "{:.1f}"),
    ]
    for kind in ("caption", "vqa", "classify"):
        rows += [(f"{kind} p50 s", f"{kind}_p50_s", "{:.2f}"), (f"{kind} p95 s", f"{kind}_p95_s", "{:.2f}")]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<14}" + "".join(f"{n:>{width}}" for n in names)]
    for label, key, fmt in rows:
        lines.append(
            f"{label:<14}"
            + "".join(f"{fmt.format(results[n].get(key, float('nan'))):>{width}}" for n in names)
        )
    for name, base in [("continuous", "static"), *((n, n.partition("+")[0]) for n in names if "+" in n)]:
        if name in results and base in results:
            new, old = results[name], results[base]
            lines.append(
                f"{name} / {base}: throughput {new['jobs_per_s'] / old['jobs_per_s']:.2f}x, "
                f"classify p95 {new['classify_p95_s'] / old['classify_p95_s']:.2f}x"
            )
    return "\n".join(lines)


def run_all(
    names: list[str], args: argparse.Namespace, checkpoint: Path, data: list[bytes], rate: float
) -> dict[str, Any]:
    """Every variant on the same arrivals at ``rate`` jobs/s, with the same warm-up and repetitions."""
    uris = ["data:image/png;base64," + base64.b64encode(d).decode() for d in data]
    jobs = workload(args.jobs, rate, len(data))
    warm = [
        Job(0.0, job.task, job.image, job.max_new_tokens, job.labels)
        for job in workload(6, 1.0, len(data), 1)
    ]
    results = {}
    for name in names:
        print(f"{name} at {rate:.2f} jobs/s ...", flush=True)
        results[name] = variant(name, checkpoint, jobs, warm, data, uris, args.repeats, args.pool_workers)
    return results


def main(argv: list[str] | None = None) -> int:
    from worker.runtime.preprocessing import default_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--rate", type=float, default=12.0, help="offered jobs/s of the capacity run")
    parser.add_argument(
        "--moderate-rate",
        type=float,
        default=0.0,
        help="offered jobs/s of the moderate run (0: half the static batcher's capacity; -1: no such run)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 jobs, 1 repetition (while developing)")
    parser.add_argument("--variants", default="seed,static,continuous,continuous+pool")
    parser.add_argument(
        "--pool-workers", type=int, default=max(1, default_workers()), help="processes of the +pool variants"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for every variant (0: torch's default)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.repeats = 16, 1
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    data = make_images(8)
    names = args.variants.split(",")
    load = [os.getloadavg()]
    results: dict[str, Any] = run_all(names, args, checkpoint, data, args.rate)
    moderate = args.moderate_rate or 0.5 * results.get("static", {}).get("jobs_per_s", 0.0)
    if moderate > 0:
        results["moderate"] = {"rate": moderate, **run_all(names, args, checkpoint, data, moderate)}
    load.append(os.getloadavg())
    print(f"\ncapacity run, offered {args.rate:g} jobs/s:\n" + report({n: results[n] for n in names}))
    if moderate > 0:
        figures = {name: results["moderate"][name] for name in names}
        print(f"\nmoderate run, offered {moderate:.2f} jobs/s:\n" + report(figures))
    print(f"load average (1, 5, 15 min) before / after: {load[0]} / {load[1]}")
    import torch
    import transformers

    meta = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": load,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serving-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({"meta": meta, **results}, indent=1) + "\n")
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}\n")
    from bench.roofline import main as roofline

    return roofline(["--serving", str(path)])


if __name__ == "__main__":
    raise SystemExit(main())
