"""Throughput benchmark: the seed's loop vs llava-queue's batched workers, measured side by side in one run.

    make bench            (or: python bench/throughput.py [--jobs 32] [--max-new-tokens 16] [--repeats 3])

(a) the seed's example-1 loop in-process (processor, then generate, one image at a time);
(b) the same caption jobs through Redis to one worker, static batching; (c) batching off (max_batch_size 1);
every variant gets the same warm-up, repetitions and median (the serving scenario, with the continuous
engine: bench/serving.py);
(d) a no-op task's round trip vs a direct call, and no-op throughput; (e) classify with 1 vs 10 labels.
All on one checkpoint: a random-weight LLaVA-NeXT with the real CLIP 336 px anyres geometry and a small LM
(``python -m worker.tiny_model --geometry real``). Prints medians and ratios; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery.result import ResultSet  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from devtools.devstack import RedisServer, WorkerProcess  # noqa: E402
from producer import ClientSettings, LlavaClient  # noqa: E402
from producer.contract import TASK_NOOP  # noqa: E402

PROMPT = "What is shown in this image?"
SIZES = [(640, 480), (480, 640), (1024, 768), (336, 336), (800, 300), (300, 800), (1280, 720), (500, 500)]
LABELS = ["cat", "dog", "car", "stop sign", "chart", "logo", "person", "tree", "building", "food"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` PNGs of mixed sizes with some drawing on them (deterministic)."""
    rng = random.Random(seed)
    images = []
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            box = sorted(rng.sample(range(size[0]), 2)), sorted(rng.sample(range(size[1]), 2))
            draw.rectangle(
                (box[0][0], box[1][0], box[0][1], box[1][1]), fill=tuple(rng.randrange(256) for _ in range(3))
            )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def build_checkpoint(cache: Path) -> Path:
    from worker.runtime.tiny_model import build, is_tiny_checkpoint

    path = cache / "bench-real-geometry"
    if not is_tiny_checkpoint(path):
        build(path, "mistral", geometry="real")
    return path


def seed_runs(checkpoint: Path, images: list[bytes], max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """(a) with the same warm-up, repetitions and statistics as the queue runs: median run of ``repeats``."""
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    seed_loop(processor, model, images[:2], max_new_tokens)  # warm-up, as the queue runs get
    runs = [seed_loop(processor, model, images, max_new_tokens) for _ in range(repeats)]
    best = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
    return {**best, "images_per_s_runs": [r["images_per_s"] for r in runs]}


def seed_loop(processor: Any, model: Any, images: list[bytes], max_new_tokens: int) -> dict[str, Any]:
    """(a) The seed's example 1, in-process: processor, then generate, one image at a time."""
    import torch

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers, preprocess, generate = [], [], []
    started = time.perf_counter()
    for data in images:
        t0 = time.perf_counter()
        inputs = processor(
            images=Image.open(io.BytesIO(data)).convert("RGB"), text=prompt, return_tensors="pt"
        )
        t1 = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generate.append((time.perf_counter() - t1) * 1000)
        preprocess.append((t1 - t0) * 1000)
        answers.append(
            processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "images_per_s": len(images) / wall,
        "job_ms_median": median([p + g for p, g in zip(preprocess, generate, strict=True)]),
        "preprocess_ms_median": median(preprocess),
        "generate_ms_median": median(generate),
        "answers": answers,
    }


def start_worker(
    settings: ClientSettings, client: LlavaClient, env: dict[str, str], logs: Path
) -> tuple[WorkerProcess, str, str]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    hostname = f"bench-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_")}
    environment |= {
        "LLAVA_BROKER_URL": settings.broker_url,
        "LLAVA_RESULT_BACKEND": settings.result_backend,
        "LLAVA_DEVICE": "cpu",
        "LLAVA_DTYPE": "float32",
        "LLAVA_ATTN_IMPLEMENTATION": "sdpa",
        "LLAVA_LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    worker = WorkerProcess(
        ["--queues", queue, "--hostname", hostname], environment, logs / f"{hostname}.log"
    ).start()
    worker.wait_ready(client.app, hostname, timeout=180)
    return worker, hostname, queue


def through_queue(
    client: LlavaClient, queue: str, images: list[bytes], max_new_tokens: int
) -> dict[str, Any]:
    """(b)/(c) Submit every caption job at once; wall time until the last result."""
    started = time.perf_counter()
    jobs = [client.caption(data, PROMPT, queue=queue, max_new_tokens=max_new_tokens) for data in images]
    results = [job.get(timeout=600) for job in jobs]
    wall = time.perf_counter() - started
    timing = {
        name: median([getattr(r.timings, name) for r in results])
        for name in ("image_ms", "preprocess_ms", "batch_wait_ms", "inference_ms", "total_ms", "batch_size")
    }
    return {
        "wall_s": wall,
        "images_per_s": len(images) / wall,
        "timings_median": timing,
        "answers": [r.text for r in results],
    }


def queue_runs(
    settings, client, checkpoint, images, max_new_tokens, max_batch_size, repeats, logs
) -> dict[str, Any]:
    env = {
        "LLAVA_MODEL": str(checkpoint),
        "LLAVA_SCHEDULER": "static",
        "LLAVA_MAX_BATCH_SIZE": str(max_batch_size),
        "LLAVA_MAX_NEW_TOKENS_CAP": "4096",
    }
    worker, _, queue = start_worker(settings, client, env, logs)
    try:
        through_queue(client, queue, images[:2], max_new_tokens)  # warm-up
        runs = [through_queue(client, queue, images, max_new_tokens) for _ in range(repeats)]
    finally:
        worker.stop()
    best = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
    return {**best, "images_per_s_runs": [r["images_per_s"] for r in runs], "max_batch_size": max_batch_size}


def noop_bench(settings, client, logs, round_trips: int, burst: int) -> dict[str, Any]:
    """(d) The queue's own cost: a no-op task's round trip vs calling a function directly."""
    from worker.app import _noop

    worker, _, queue = start_worker(
        settings, client, {"LLAVA_MODEL": "tiny:mistral", "LLAVA_MAX_BATCH_SIZE": "8"}, logs
    )
    try:
        send = lambda: client.app.send_task(TASK_NOOP, queue=queue)  # noqa: E731
        for _ in range(20):
            send().get(timeout=30)
        trips = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            send().get(timeout=30)
            trips.append((time.perf_counter() - t0) * 1000)
        task = type("T", (), {"request": type("R", (), {"hostname": "direct"})()})()
        direct = []
        for _ in range(round_trips):
            t0 = time.perf_counter()
            _noop(task)
            direct.append((time.perf_counter() - t0) * 1000)
        # Throughput of the worker alone: queue the burst while it does not consume, then let it go.
        hostname = worker.args[worker.args.index("--hostname") + 1]
        client.app.control.cancel_consumer(queue, destination=[hostname], reply=True)
        pending = ResultSet([send() for _ in range(burst)])
        t0 = time.perf_counter()
        client.app.control.add_consumer(queue, destination=[hostname], reply=True)
        pending.join_native(timeout=120)
        throughput = burst / (time.perf_counter() - t0)
    finally:
        worker.stop()
    return {
        "round_trip_ms_p50": median(trips),
        "direct_call_ms_p50": median(direct),
        "overhead_ms_p50": median(trips) - median(direct),
        "tasks_per_s": throughput,
    }


def classify_bench(checkpoint: Path, image: bytes, repeats: int) -> dict[str, Any]:
    """(e) One classify job's cost (processor + scoring) with 1 vs 10 labels, in-process."""
    from worker.images import decode_image
    from worker.runtime import Prompt, Runtime
    from worker.runtime.scoring import LabelQuery
    from worker.settings import WorkerSettings

    runtime = Runtime(WorkerSettings(model=str(checkpoint), device="cpu", dtype="float32"))
    picture = decode_image(image, 10**8)

    def cost(labels: list[str]) -> Callable[[], None]:
        text = f"Classify the object in the image. Answer with one of: {', '.join(labels)}."
        query = LabelQuery(text)
        return lambda: runtime.score_labels(
            [runtime.prepare(Prompt(picture, text))], [labels], queries=[query]
        )

    def timed(fn: Callable[[], None]) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000)
        return median(samples)

    one, ten = timed(cost(LABELS[:1])), timed(cost(LABELS))
    return {"one_label_ms": one, "ten_labels_ms": ten, "ratio": ten / one}


def report(results: dict[str, Any]) -> str:
    a, b, c, d, e = (results[k] for k in ("seed_loop", "batched", "unbatched", "noop", "classify"))
    rows = [
        (
            "(a) seed loop, in-process",
            f"{a['images_per_s']:.2f} img/s",
            f"job {a['job_ms_median']:.0f} ms = "
            f"preprocess {a['preprocess_ms_median']:.0f} + generate {a['generate_ms_median']:.0f}",
        ),
        (
            f"(b) queue, batching on (max {b['max_batch_size']})",
            f"{b['images_per_s']:.2f} img/s",
            f"(b)/(a) = {b['images_per_s'] / a['images_per_s']:.2f}x",
        ),
        (
            "(c) queue, batching off",
            f"{c['images_per_s']:.2f} img/s",
            f"(b)/(c) = {b['images_per_s'] / c['images_per_s']:.2f}x; "
            f"(c)/(a) = {c['images_per_s'] / a['images_per_s']:.2f}x",
        ),
        (
            "(d) no-op round trip p50",
            f"{d['round_trip_ms_p50']:.2f} ms",
            f"overhead over a direct call {d['overhead_ms_p50']:.2f} ms; {d['tasks_per_s']:.0f} tasks/s",
        ),
        (
            "(e) classify 1 vs 10 labels",
            f"{e['one_label_ms']:.0f} / {e['ten_labels_ms']:.0f} ms",
            f"10/1 = {e['ratio']:.2f}x",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value:>16}  {note}" for name, value, note in rows]
    bt = b["timings_median"]
    lines.append(
        f"batched job median: image {bt['image_ms']:.1f} ms, preprocess {bt['preprocess_ms']:.1f} ms "
        f"(job thread), wait {bt['batch_wait_ms']:.1f} ms, model {bt['inference_ms']:.1f} ms, "
        f"batch size {bt['batch_size']:.0f}"
    )
    same = a["answers"] == b["answers"] == c["answers"]
    lines.append(f"answers identical across (a), (b), (c): {'yes' if same else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noop-round-trips", type=int, default=300)
    parser.add_argument("--noop-burst", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    checkpoint = build_checkpoint(Path(os.environ.get("LLAVA_BENCH_CACHE", ROOT / ".cache")))
    images = make_images(args.jobs)
    (work / "redis").mkdir()
    redis = RedisServer(data_dir=work / "redis").start()
    settings = ClientSettings(broker_url=redis.url(0), result_backend=redis.url(1), result_timeout=600)
    client = LlavaClient(settings)
    results: dict[str, Any] = {}
    try:
        print("(a) seed loop ...", flush=True)
        results["seed_loop"] = seed_runs(checkpoint, images, args.max_new_tokens, args.repeats)
        print("(b) batched ...", flush=True)
        results["batched"] = queue_runs(
            settings, client, checkpoint, images, args.max_new_tokens, args.max_batch_size, args.repeats, work
        )
        print("(c) unbatched ...", flush=True)
        results["unbatched"] = queue_runs(
            settings, client, checkpoint, images, args.max_new_tokens, 1, args.repeats, work
        )
        print("(d) no-op ...", flush=True)
        results["noop"] = noop_bench(settings, client, work, args.noop_round_trips, args.noop_burst)
        print("(e) classify ...", flush=True)
        results["classify"] = classify_bench(checkpoint, images[0], repeats=10)
    finally:
        client.close()
        redis.stop()
    text = report(results)
    print("\n" + text)
    results["meta"] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    import torch
    import transformers

    results["meta"] |= {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throughput-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    for key in ("seed_loop", "batched", "unbatched"):
        results[key].pop("answers", None)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
