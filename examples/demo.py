"""The demo behind ``make demo``: one tiny-model worker, a caption, a VQA and a classify job, three results.

Run through ``python -m devtools.devstack -- python examples/demo.py`` so that a Redis answers.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devtools/ is not installed: it is imported from the checkout

from devtools.devstack import WorkerProcess  # noqa: E402
from producer import LlavaClient, load_settings  # noqa: E402
from producer.settings import ClientSettings  # noqa: E402

IMAGES = ROOT / "examples" / "images"


def _start_worker(settings: ClientSettings, client: LlavaClient, queue: str) -> WorkerProcess:
    hostname = f"demo-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    env = {
        **os.environ,
        "LLAVA_BROKER_URL": settings.broker_url,
        "LLAVA_RESULT_BACKEND": settings.result_backend,
    }
    log = Path(tempfile.gettempdir()) / "llava-demo-worker.log"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--queues", queue, "--hostname", hostname]
    worker = WorkerProcess(args, env, log).start()
    print(f"starting a worker on configs/tiny.yaml (log: {log}) ...", flush=True)
    worker.wait_ready(client.app, hostname)
    return worker


def main() -> int:
    settings = load_settings(ClientSettings)
    client = LlavaClient(settings)
    queue = f"demo-{uuid.uuid4().hex[:8]}"  # our own queue: never steals jobs meant for a real fleet
    worker = _start_worker(settings, client, queue)
    try:
        submit = {
            "caption": lambda: client.caption(IMAGES / "radar_chart.png", queue=queue),
            "vqa": lambda: client.vqa(IMAGES / "stop_sign.jpg", "What does the sign say?", queue=queue),
            "classify": lambda: client.classify(
                IMAGES / "transparent_logo.png", labels=["logo", "chart", "street sign"], queue=queue
            ),
        }
        for kind, send in submit.items():
            started = time.perf_counter()
            job = send()
            result = job.get(timeout=120)
            latency = (time.perf_counter() - started) * 1000
            worker_ms = result.timings.total_ms
            print(
                f"\n== {kind}: job {job.id}, {latency:.0f} ms end to end ({worker_ms:.0f} ms on the worker)"
            )
            print(result.model_dump_json(indent=2))
    finally:
        code = worker.stop()
        client.close()
    print(f"\nworker stopped (exit {code}); the answers are gibberish: the tiny model has random weights.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
