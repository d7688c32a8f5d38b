"""Flower against the broker, started the documented way (no torch): workers online, task states, no image
bytes in what it shows."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid

import pytest
import requests

from producer import InvalidImage, LlavaClient
from producer.cli import flower_argv
from producer.settings import ClientSettings
from tests.integration.conftest import IMAGES, ROOT
from worker.devstack import free_port

AUTH = ("admin", f"pw-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def flower(client_settings: ClientSettings, tmp_path_factory) -> str:
    port = free_port()
    settings = client_settings.model_copy(update={"flower_port": port, "flower_basic_auth": ":".join(AUTH)})
    log = open(tmp_path_factory.mktemp("flower") / "flower.log", "wb")  # noqa: SIM115
    # What `llava-queue flower` runs: `celery --broker=... flower --port=... --basic-auth=...`.
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", *flower_argv(settings)[1:]],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{base}/api/workers", auth=AUTH, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "flower did not start"
        time.sleep(0.3)
    yield base
    process.terminate()
    process.wait(30)
    log.close()


def test_flower_sees_workers_and_task_states_without_image_bytes(
    flower: str, client: LlavaClient, start_worker
) -> None:
    queue = f"flower-{uuid.uuid4().hex[:8]}"
    _, hostname = start_worker(queue)
    data = (IMAGES / "stop_sign.jpg").read_bytes()
    good = client.caption(data, queue=queue)
    bad = client.caption(b"definitely not an image", queue=queue)
    good.get()
    with pytest.raises(InvalidImage):
        bad.get()
    assert requests.get(f"{flower}/api/workers", timeout=5).status_code == 401  # basic auth is on

    def tasks() -> dict:
        return requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()

    deadline = time.monotonic() + 30
    while {tasks().get(good.id, {}).get("state"), tasks().get(bad.id, {}).get("state")} != {
        "SUCCESS",
        "FAILURE",
    }:
        assert time.monotonic() < deadline, f"flower did not see both states: {tasks()}"
        time.sleep(0.5)
    seen = tasks()
    assert seen[good.id]["name"] == "llava.caption" and seen[good.id]["worker"] == hostname
    assert "invalid_image" in seen[bad.id]["exception"]
    payload = base64.b64encode(data).decode()
    shown = " ".join(str(seen[t].get(f)) for t in (good.id, bad.id) for f in ("args", "kwargs"))
    assert payload[:24] not in shown and "sha256" in shown
    alive = requests.get(f"{flower}/api/workers", params={"status": 1}, auth=AUTH, timeout=15).json()
    assert alive.get(hostname) is True  # from the worker's heartbeat events, as the Workers page shows
    workers = requests.get(f"{flower}/api/workers", params={"refresh": 1}, auth=AUTH, timeout=30).json()
    queues = {q["name"] for q in workers[hostname]["active_queues"]}  # Flower's own inspect of the worker
    assert queue in queues and "llava.caption" in workers[hostname]["registered"]
