"""Flower against the broker, started the documented way (no torch): workers online, task states, no image
bytes in what it shows."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devtools.devstack import free_port
from producer import InvalidImage, LlavaClient, LlavaError
from producer.settings import ClientSettings
from tests.integration.conftest import IMAGES, wait_for, worker_env

AUTH = ("admin", f"pw-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def flower(client_settings: ClientSettings, cache_dir, tmp_path_factory) -> Iterator[str]:
    """``llava-queue flower`` as documented: basic auth from LLAVA_FLOWER_BASIC_AUTH, default address."""
    port = free_port()
    env = worker_env(client_settings, cache_dir, LLAVA_FLOWER_PORT=str(port))
    env["LLAVA_FLOWER_BASIC_AUTH"] = ":".join(AUTH)
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    log = open(log_path, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "flower"], env=env, stdout=log, stderr=subprocess.STDOUT
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
    # The process is Flower now (exec): its command line holds neither the password nor the broker URL.
    command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "flower" in command_line and "--address=127.0.0.1" in command_line
    assert AUTH[1] not in command_line and client_settings.broker_url not in command_line
    assert f"llava-queue: Flower on {base}/ (basic auth on)" in log_path.read_text()
    yield base
    process.terminate()
    process.wait(30)
    log.close()


def listening(flower: str, hostname: str) -> None:
    """Wait until Flower receives ``hostname``'s events (heartbeats): a job's events sent before are lost."""

    def alive() -> bool:
        answer = requests.get(f"{flower}/api/workers", params={"status": 1}, auth=AUTH, timeout=15)
        return answer.json().get(hostname) is True

    wait_for(alive, 30, f"flower to receive the events of {hostname}")


def test_flower_refuses_an_open_address_without_auth(client_settings, monkeypatch, capsys) -> None:
    """``llava-queue flower`` in-process: a refusal returns before it would exec Flower."""
    from producer import cli

    monkeypatch.setenv("LLAVA_BROKER_URL", client_settings.broker_url)
    monkeypatch.setenv("LLAVA_FLOWER_PORT", str(free_port()))
    monkeypatch.delenv("LLAVA_FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.setattr(cli.os, "execvpe", lambda *_: pytest.fail("Flower started without auth"))
    for address in ("0.0.0.0", "::", "192.168.1.10", "flower.example.com"):
        assert cli.main(["flower", "--address", address]) == 2
        assert "LLAVA_FLOWER_BASIC_AUTH" in capsys.readouterr().err


def test_metrics_and_healthcheck_show_no_job_arguments(
    flower: str, client: LlavaClient, shared_worker
) -> None:
    """What the README says: /healthcheck and /metrics answer without auth, with names and counts only."""
    _, hostname, queue = shared_worker
    listening(flower, hostname)
    secret = "https://user:hunter2@images.example/private.png?X-Amz-Signature=abc"
    job = client.caption(secret, queue=queue)
    with pytest.raises(LlavaError):
        job.get()
    assert requests.get(f"{flower}/healthcheck", timeout=5).text == "OK"

    def metrics() -> str:
        return requests.get(f"{flower}/metrics", timeout=5).text

    def counted() -> bool:  # the job's events, counted under its worker
        lines = [line for line in metrics().splitlines() if line.startswith("flower_events_total{")]
        return any('task="llava.caption"' in line and f'worker="{hostname}"' in line for line in lines)

    wait_for(counted, 30, "flower to count the job's events")
    text = metrics()
    assert "hunter2" not in text and "X-Amz-Signature" not in text and job.id not in text


def test_flower_sees_workers_and_task_states_without_image_bytes(
    flower: str, client: LlavaClient, shared_worker
) -> None:
    _, hostname, queue = shared_worker
    listening(flower, hostname)
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
