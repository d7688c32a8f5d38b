"""Claim-check benchmark: inline images in the broker message vs image bytes in the blob store, side by side.

    python bench/claim_check.py [--repeats 20] [--image-kb 1024]

For both producer modes (``LLAVA_BLOB_STORE=off``: a data: URI in the message; ``redis``: the bytes stored
once by hash, a ``blob:sha256:`` reference in the message), on one Redis and one tiny worker:
(a) Redis bytes per queued job and message size (jobs queued on a queue nobody consumes; distinct images);
(b) end to end minus worker time of one 1 MB image caption job (send, publish, fetch, decode, result), a new
    image each job, medians after the same warm-up, and the round trip of a no-op job (the queue's own floor);
(c) image-job and no-op throughput of the worker (a burst queued, then consumed).
Prints medians and ratios; writes JSON to bench/results/.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery.result import ResultSet  # noqa: E402
from PIL import Image  # noqa: E402

from devtools.devstack import RedisServer, WorkerProcess  # noqa: E402
from producer import ClientSettings, LlavaClient  # noqa: E402
from producer.contract import TASK_NOOP  # noqa: E402

MODES = ("off", "redis")


def noise_png(kilobytes: int, seed: int) -> bytes:
    """A PNG of about ``kilobytes`` KB (random pixels do not compress)."""
    side = int((kilobytes * 1024 / 3) ** 0.5)
    image = Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def client_for(redis_server: RedisServer, mode: str) -> LlavaClient:
    return LlavaClient(
        ClientSettings(
            broker_url=redis_server.url(0),
            result_backend=redis_server.url(1),
            blob_store=mode,
            result_timeout=120,
        )
    )


def start_worker(redis_server: RedisServer, logs: Path) -> tuple[WorkerProcess, str, str]:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    hostname = f"bench-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_")}
    environment |= {
        "LLAVA_BROKER_URL": redis_server.url(0),
        "LLAVA_RESULT_BACKEND": redis_server.url(1),
        "LLAVA_MODEL": "tiny:mistral",
        "LLAVA_DEVICE": "cpu",
        "LLAVA_LOGLEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    worker = WorkerProcess(["--queues", queue, "--hostname", hostname], environment, logs / f"{hostname}.log")
    worker.start()
    probe = client_for(redis_server, "off")
    worker.wait_ready(probe.app, hostname, timeout=180)
    probe.close()
    return worker, hostname, queue


def stored_bytes(redis_server: RedisServer) -> int:
    """What the keys of both databases take (``MEMORY USAGE ... SAMPLES 0``: values, keys and allocator
    rounding, every field of a hash; not transient client or AOF buffers)."""
    total = 0
    for db in (0, 1):
        client = redis.Redis.from_url(redis_server.url(db))
        total += sum(int(client.memory_usage(key, samples=0) or 0) for key in client.scan_iter(count=1000))
    return total


def queued_cost(redis_server: RedisServer, client: LlavaClient, images: list[bytes]) -> dict[str, float]:
    """(a) Redis memory per queued job and the message's size, on a queue nobody consumes."""
    queue = f"unconsumed-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(redis_server.url(0))
    before = stored_bytes(redis_server)
    for image in images:
        client.caption(image, queue=queue)
    after = stored_bytes(redis_server)
    sizes = [len(m) for key in broker.scan_iter(f"{queue}*") for m in broker.lrange(key, 0, -1)]
    for key in broker.scan_iter(f"{queue}*"):
        broker.delete(key)
    backend = redis.Redis.from_url(redis_server.url(1))
    for key in backend.scan_iter("llava-blob-*"):  # the queued jobs never run: drop their blobs
        backend.delete(key)
    return {
        "redis_bytes_per_job": (after - before) / len(images),
        "message_bytes_p50": statistics.median(sizes),
        "image_bytes": statistics.median(len(i) for i in images),
    }


def outside_worker_ms(clients: dict[str, LlavaClient], queue: str, kilobytes: int, repeats: int) -> dict:
    """(b) End to end minus the worker's own time, one job at a time, the modes interleaved job by job (so
    the machine's load hits both alike), after the same warm-up; then no-op round trips the same way. Each
    job sends a new image (same size, other pixels), as a moderation flow does: every job pays the upload."""
    images = iter([noise_png(kilobytes, 1000 + i) for i in range((repeats + 3) * len(clients))])
    for client in clients.values():
        for _ in range(3):
            client.caption(next(images), queue=queue, max_new_tokens=1).get()
    runs: dict[str, dict[str, list[float]]] = {mode: {"total": [], "outside": []} for mode in clients}
    for _ in range(repeats):
        for mode, client in clients.items():
            image = next(images)
            started = time.perf_counter()
            result = client.caption(image, queue=queue, max_new_tokens=1).get()
            elapsed = (time.perf_counter() - started) * 1000
            runs[mode]["total"].append(elapsed)
            runs[mode]["outside"].append(elapsed - result.timings.total_ms)
    noop: dict[str, list[float]] = {mode: [] for mode in clients}
    for _ in range(repeats):  # after the image jobs, so that they run exactly as before this figure existed
        for mode, client in clients.items():
            started = time.perf_counter()
            client.app.send_task(TASK_NOOP, queue=queue).get(timeout=60)
            noop[mode].append((time.perf_counter() - started) * 1000)
    return {
        mode: {
            "end_to_end_ms_p50": statistics.median(run["total"]),
            "outside_worker_ms_p50": statistics.median(run["outside"]),
            "noop_round_trip_ms_p50": statistics.median(noop[mode]),
        }
        for mode, run in runs.items()
    }


def burst_throughput(client: LlavaClient, hostname: str, queue: str, send: Any, count: int) -> float:
    """(c) Jobs per second of the worker alone: queue ``count`` while it does not consume, then let it go."""
    client.app.control.cancel_consumer(queue, destination=[hostname], reply=True)
    pending = ResultSet([send() for _ in range(count)])
    started = time.perf_counter()
    client.app.control.add_consumer(queue, destination=[hostname], reply=True)
    pending.join_native(timeout=600)
    return count / (time.perf_counter() - started)


def run_modes(redis_server: RedisServer, worker: tuple[Any, str, str], args: argparse.Namespace) -> dict:
    _, hostname, queue = worker
    clients = {mode: client_for(redis_server, mode) for mode in MODES}
    try:
        distinct = [noise_png(args.image_kb, seed) for seed in range(args.queued)]
        image = distinct[0]
        results: dict[str, dict[str, float]] = {
            mode: queued_cost(redis_server, client, distinct) for mode, client in clients.items()
        }
        for mode, figures in outside_worker_ms(clients, queue, args.image_kb, args.repeats).items():
            results[mode] |= figures
        bursts: dict[str, dict[str, list[float]]] = {mode: {"image": [], "noop": []} for mode in clients}
        for _ in range(3):  # modes alternated, medians: the machine's load hits both alike
            for mode, client in clients.items():
                image_send = lambda c=client: c.caption(image, queue=queue, max_new_tokens=1).async_result  # noqa: E731
                noop_send = lambda c=client: c.app.send_task(TASK_NOOP, queue=queue)  # noqa: E731
                bursts[mode]["image"].append(
                    burst_throughput(client, hostname, queue, image_send, args.burst)
                )
                bursts[mode]["noop"].append(burst_throughput(client, hostname, queue, noop_send, 200))
        for mode, runs in bursts.items():
            results[mode]["image_jobs_per_s"] = statistics.median(runs["image"])
            results[mode]["noop_jobs_per_s"] = statistics.median(runs["noop"])
        return results
    finally:
        for client in clients.values():
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--image-kb", type=int, default=1024)
    parser.add_argument("--queued", type=int, default=10, help="distinct images queued for (a)")
    parser.add_argument("--burst", type=int, default=40, help="image jobs for (c)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="llava-bench-claim-"))
    redis_server = RedisServer(data_dir=work / "redis").start()
    try:
        worker = start_worker(redis_server, work)
        try:
            results = run_modes(redis_server, worker, args)
        finally:
            worker[0].stop()
    finally:
        redis_server.stop()
    inline, blob = results["off"], results["redis"]
    lines = [f"claim check, {args.image_kb} KB PNG, medians ({args.repeats} jobs per mode, interleaved)"]
    for key in inline:
        ratio = blob[key] / inline[key] if inline[key] else float("nan")
        lines.append(f"  {key:24s} inline {inline[key]:12.1f}   blob {blob[key]:12.1f}   ratio {ratio:6.2f}")
    print("\n".join(lines))
    results["meta"] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"claim-check-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
