"""Peak memory of one worker given max-cap images: N concurrent 6300 x 6300 PNGs (all zeros, under the 40 MP
pixel cap, about 116 KB each) sent at once to a tiny worker on a fresh Redis.

    make bench-memory     (or: python bench/image_memory.py [--jobs 8] [--side 6300] [--geometry real|tiny]
                                                        [--baseline DIR] [--repeats N])

``--geometry real``: a random-weight LLaVA-NeXT with the real CLIP 336 px anyres geometry (what real
checkpoints keep of an image); ``tiny``: the test checkpoint. Measured side by side in one run, each on a
fresh worker: ``--baseline DIR`` (another checkout, e.g. ``git archive main | tar -x -C DIR``), this
checkout, and this checkout given images already at the size it shrinks them to (same image tokens: what
the model itself costs).
Prints the worker's peak resident memory (VmHWM) once ready and after the jobs; writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from devtools.devstack import RedisServer, WorkerProcess  # noqa: E402
from producer import ClientSettings, LlavaClient  # noqa: E402


def zero_png(side: int) -> bytes:
    """A ``side`` x ``side`` all-black RGB PNG: tiny on the wire, ``3 * side**2`` bytes decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of process ``pid`` now (VmRSS) and at its peak so far (VmHWM), in MB (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = round(int(value.split()[0]) * 1024 / 1e6, 1)
    return {"rss_mb": fields["VmRSS"], "peak_mb": fields["VmHWM"]}


def concurrent_images(client: LlavaClient, queue: str, pid: int, jobs: int, side: int) -> dict[str, Any]:
    """Send ``jobs`` caption jobs with a ``side``-px zero PNG at once, wait for all; the worker's memory."""
    image = zero_png(side)
    before = memory_mb(pid)
    sent = [client.caption(image, queue=queue, max_new_tokens=2) for _ in range(jobs)]
    results = [job.get(timeout=600) for job in sent]
    after = memory_mb(pid)
    return {
        "jobs": jobs,
        "side": side,
        "png_bytes": len(image),
        "image_tokens": results[0].image_tokens,
        "ready_peak_mb": before["peak_mb"],
        "peak_mb": after["peak_mb"],
        "growth_mb": round(after["peak_mb"] - before["peak_mb"], 1),
        "rss_after_mb": after["rss_mb"],
    }


def checkpoint(geometry: str, cache: Path) -> str:
    if geometry == "tiny":
        return "tiny:mistral"
    from worker.runtime.tiny_model import build, is_tiny_checkpoint

    path = cache / "bench-real-geometry"  # the same checkpoint bench/throughput.py builds
    if not is_tiny_checkpoint(path):
        build(path, "mistral", geometry="real")
    return str(path)


def run(code: Path, side: int, jobs: int, model: str, cache: Path) -> dict[str, Any]:
    """One fresh Redis and one fresh tiny worker running ``code``; the jobs; the worker's memory."""
    with tempfile.TemporaryDirectory() as scratch:
        redis = RedisServer(data_dir=Path(scratch) / "redis").start()
        settings = ClientSettings(broker_url=redis.url(0), result_backend=redis.url(1))
        client = LlavaClient(settings)
        queue, hostname = f"mem-{uuid.uuid4().hex[:8]}", f"mem-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAVA_")}
        env |= {
            "LLAVA_BROKER_URL": settings.broker_url,
            "LLAVA_RESULT_BACKEND": settings.result_backend,
            "LLAVA_MODEL": model,
            "LLAVA_CACHE_DIR": str(cache),
            "LLAVA_DEVICE": "cpu",
            "LLAVA_DTYPE": "float32",
            "LLAVA_MAX_BATCH_SIZE": "4",
            "LLAVA_LOGLEVEL": "WARNING",
            "PYTHONPATH": str(code),
        }
        worker = WorkerProcess(["--queues", queue, "--hostname", hostname], env, Path(scratch) / "w.log")
        here = Path.cwd()
        try:
            os.chdir(code)  # python -m puts the working directory first on sys.path
            worker.start()
            os.chdir(here)
            worker.wait_ready(client.app, hostname, timeout=300)
            assert worker.process is not None
            return concurrent_images(client, queue, worker.process.pid, jobs, side)
        finally:
            os.chdir(here)
            worker.stop()
            client.close()
            redis.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--side", type=int, default=6300)
    parser.add_argument("--geometry", choices=["real", "tiny"], default="real")
    parser.add_argument("--baseline", help="another checkout to measure first, side by side (e.g. main)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh workers per variant (median printed)")
    args = parser.parse_args()
    cache = Path(os.environ.get("LLAVA_TEST_CACHE_DIR", Path.home() / ".cache" / "llava-queue"))
    model = checkpoint(args.geometry, cache)
    same_tokens = args.side // shrink_factor_for(args.side, model, cache)
    variants = [("this checkout", ROOT, args.side), (f"this checkout, {same_tokens} px", ROOT, same_tokens)]
    if args.baseline:
        variants.insert(0, ("baseline", Path(args.baseline).resolve(), args.side))
    figures: dict[str, Any] = {"jobs": args.jobs, "geometry": args.geometry, "variants": {}}
    for label, code, side in variants:
        runs = [run(code, side, args.jobs, model, cache) for _ in range(args.repeats)]
        peak = statistics.median(r["peak_mb"] for r in runs)
        growth = statistics.median(r["growth_mb"] for r in runs)
        figures["variants"][label] = {
            "side": side,
            "peak_mb_median": peak,
            "growth_mb_median": growth,
            "runs": runs,
        }
        print(
            f"{label}: {args.jobs} concurrent {side}x{side} PNGs ({args.geometry} geometry): worker peak RSS "
            f"{runs[0]['ready_peak_mb']:.0f} MB ready -> {peak:.0f} MB (+{growth:.0f} MB), "
            f"median of {len(runs)}"
        )
    out = ROOT / "bench" / "results" / f"image-memory-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def shrink_factor_for(side: int, model: str, cache: Path) -> int:
    """The factor this checkout's worker shrinks a ``side`` px square by (for the same-tokens reference)."""
    from transformers import AutoImageProcessor

    from worker.images import keep_side_for, shrink_factor
    from worker.runtime import resolve_model_source
    from worker.settings import WorkerSettings

    source = resolve_model_source(WorkerSettings(model=model, cache_dir=cache))
    return shrink_factor(side, side, keep_side_for(AutoImageProcessor.from_pretrained(source)))


if __name__ == "__main__":
    raise SystemExit(main())
