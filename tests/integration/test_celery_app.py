"""`celery -A worker.celery_app ...`: Celery's own command line drives and inspects llava workers."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devstack import WorkerProcess
from producer import CaptionResult, LlavaClient
from producer.settings import ClientSettings
from tests.integration.conftest import IMAGES, TINY_CONFIG, health, worker_env
from worker.settings import WorkerSettings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.long]


def celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


class CeleryWorker(WorkerProcess):
    """``celery -A worker.celery_app worker ARGS``: ``python -m celery`` (forked from the preloaded
    forkserver with ``fork=True``, as the tests' other workers are)."""

    module = "celery"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, fork: bool = False) -> None:
        super().__init__(["-A", "worker.celery_app", "worker", *args], env, log_path, fork)


@contextlib.contextmanager
def celery_worker(
    client: LlavaClient, settings: ClientSettings, cache_dir: Path, log: Path, *args: str
) -> Iterator[tuple[CeleryWorker, str, str]]:
    """A ready ``celery -A worker.celery_app worker`` on a queue of its own: (worker, node, queue); it must
    stop with status 0."""
    queue = f"it-{uuid.uuid4().hex[:8]}"
    hostname = f"c{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    env = worker_env(settings, cache_dir, LLAVA_CONFIG=str(TINY_CONFIG), LLAVA_QUEUES=queue)
    worker = CeleryWorker(["--hostname", hostname, *args], env, log, fork=True).start()
    try:
        worker.wait_ready(client.app, hostname)
        yield worker, hostname, queue
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_celery_inspect_llava_health_answers_for_a_llava_worker(
    shared_worker: tuple[WorkerProcess, str, str], client_settings: ClientSettings, cache_dir: Path
) -> None:
    worker, hostname, _ = shared_worker
    env = worker_env(client_settings, cache_dir)
    answer = celery(env, "inspect", "llava_health", "--destination", hostname, "--timeout", "10", "--json")
    assert answer.returncode == 0, answer.stderr
    health = json.loads(answer.stdout)[hostname]
    assert health["model_loaded"] is True and health["pid"] == worker.process.pid  # type: ignore[union-attr]
    assert '"model_loaded": true' in answer.stdout  # what the compose healthcheck greps for
    # --destination: it returns when that worker answers (without, it waits out the whole --timeout)
    status = celery(env, "status", "--destination", hostname, "--timeout", "10")
    assert status.returncode == 0 and hostname in status.stdout


def test_celery_worker_serves_jobs_with_the_project_settings(
    client: LlavaClient, client_settings: ClientSettings, cache_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "celery-worker.log"
    with celery_worker(client, client_settings, cache_dir, log) as (_, hostname, queue):
        result = client.caption(IMAGES / "stop_sign.jpg", queue=queue).get(timeout=60)
        assert isinstance(result, CaptionResult) and result.worker == hostname
        [stats] = client.app.control.inspect(destination=[hostname], timeout=5).stats().values()
        assert stats["pool"]["implementation"].endswith("thread:TaskPool")
        threads = load_settings(WorkerSettings, config_file=TINY_CONFIG).threads
        assert stats["pool"]["max-concurrency"] == threads  # what llava-worker runs with
        assert health(client, hostname, timeout=10)["jobs_done"] == 1  # (`celery inspect`: the test above)


def test_celery_worker_that_cannot_load_its_model_exits_1_saying_why_once(
    client_settings: ClientSettings, cache_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-checkpoint"
    env = worker_env(client_settings, cache_dir, LLAVA_CONFIG=str(TINY_CONFIG), LLAVA_MODEL=str(missing))
    worker = CeleryWorker(["--hostname", "never@here"], env, tmp_path / "bad.log").start()
    assert worker.process is not None and worker.process.wait(timeout=120) == 1
    log = worker.log_tail(200)
    assert log.count("llava-worker: cannot start") == 1, log
    assert str(missing) in log
