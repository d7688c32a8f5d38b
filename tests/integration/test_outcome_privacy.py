"""What a job's outcome shows outside the worker: a stored failure and its ``task-failed`` event hold the
error's code and message, never a traceback; the worker's log at INFO says a job succeeded, never its result
(a caption of a user's image), for ``llava-worker`` and ``celery -A worker.celery_app worker`` alike."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from devtools.devstack import WorkerProcess
from producer import InvalidImage, LlavaClient
from producer.settings import ClientSettings
from tests.integration.conftest import IMAGES, wait_for
from tests.integration.test_celery_app import celery_worker

pytestmark = pytest.mark.integration

WAIT = 60  # seconds: a generous bound on any wait


class _EventLog:
    """The cluster's events, received on a thread from when :meth:`start` returns (a worker has answered)."""

    def __init__(self, app: Celery) -> None:
        self.events: list[dict[str, Any]] = []
        self._heard = threading.Event()
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"wakeup": True}, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._heard.set()

    def start(self) -> _EventLog:
        self._thread.start()  # wakeup: every worker answers with a heartbeat once the receiver listens
        assert self._heard.wait(WAIT), "no worker event arrived"
        return self

    def of(self, job_id: str, kind: str) -> list[dict[str, Any]]:
        return [event for event in list(self.events) if event.get("uuid") == job_id and event["type"] == kind]

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(10)
        self._connection.release()


def test_a_failed_jobs_stored_result_and_event_hold_no_traceback(
    client: LlavaClient, client_settings: ClientSettings, shared_worker
) -> None:
    _, _, queue = shared_worker
    events = _EventLog(client.app).start()
    try:
        job = client.caption((IMAGES / "radar_chart.png").read_bytes()[:500], queue=queue)
        with pytest.raises(InvalidImage):  # the producer still reads the code
            job.get(timeout=WAIT)
        wait_for(lambda: events.of(job.id, "task-failed"), WAIT, "the task-failed event")
    finally:
        events.stop()
    raw = redis.Redis.from_url(client_settings.result_backend).get(f"celery-task-meta-{job.id}")
    assert raw is not None
    meta = json.loads(raw)
    assert meta["status"] == "FAILURE" and meta["traceback"] is None
    assert meta["result"]["exc_message"][1] == "invalid_image"
    assert "Traceback" not in raw.decode() and ".py" not in raw.decode()
    [failed] = events.of(job.id, "task-failed")
    assert not failed.get("traceback")
    assert "invalid_image" in failed["exception"] and ".py" not in json.dumps(failed)


def _caption_is_not_logged(client: LlavaClient, queue: str, worker: WorkerProcess) -> None:
    job = client.caption(IMAGES / "stop_sign.jpg", queue=queue, max_new_tokens=16)
    text = job.get(timeout=WAIT).text
    assert len(text) >= 8, "too short a caption to look for"
    success = f"{job.id}] succeeded in "
    wait_for(lambda: success in worker.log_path.read_text(errors="replace"), WAIT, "the success line")
    log = worker.log_path.read_text(errors="replace")
    assert text not in log and repr(text)[1:-1] not in log
    [line] = [line for line in log.splitlines() if success in line]
    assert line.rstrip().endswith("s"), line  # "succeeded in 0.12s", and nothing after it


def test_llava_worker_logs_a_success_without_its_result(client: LlavaClient, shared_worker) -> None:
    worker, _, queue = shared_worker
    _caption_is_not_logged(client, queue, worker)


@pytest.mark.long
def test_celery_worker_logs_a_success_without_its_result(
    client: LlavaClient, client_settings: ClientSettings, cache_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "celery-worker.log"
    with celery_worker(client, client_settings, cache_dir, log, "--loglevel", "INFO") as (worker, _, queue):
        _caption_is_not_logged(client, queue, worker)
