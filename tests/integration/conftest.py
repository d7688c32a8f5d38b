"""Integration fixtures: a real redis-server on a free port, real worker subprocesses, the tiny checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer import LlavaClient
from producer.settings import ClientSettings
from tests.integration.image_server import ImageServer
from worker.devstack import RedisServer, WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
IMAGES = ROOT / "examples" / "images"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is required for integration tests and was not found on PATH: "
            "install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)",
            pytrace=False,
        )
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where workers build (once) and find the tiny checkpoints."""
    path = Path(os.environ.get("LLAVA_TEST_CACHE_DIR", tmp_path_factory.mktemp("llava-cache")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(cache_dir: Path) -> Path:
    from worker.runtime import resolve_model_source
    from worker.settings import WorkerSettings

    return Path(resolve_model_source(WorkerSettings(model="tiny:mistral", cache_dir=cache_dir)))


@pytest.fixture(scope="session")
def client_settings(redis_server: RedisServer) -> ClientSettings:
    return ClientSettings(
        broker_url=redis_server.url(0), result_backend=redis_server.url(1), result_timeout=60
    )


@pytest.fixture(scope="session")
def client(client_settings: ClientSettings) -> Iterator[LlavaClient]:
    llava = LlavaClient(client_settings)
    yield llava
    llava.close()


def worker_env(client_settings: ClientSettings, cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLAVA_")}
    env.update(
        LLAVA_BROKER_URL=client_settings.broker_url,
        LLAVA_RESULT_BACKEND=client_settings.result_backend,
        LLAVA_CACHE_DIR=str(cache_dir),
        LLAVA_PEER_CHECK_TIMEOUT="0.3",  # local replies come in milliseconds
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


StartWorker = Callable[..., tuple[WorkerProcess, str]]


@pytest.fixture(scope="session")
def start_worker(
    client: LlavaClient,
    client_settings: ClientSettings,
    cache_dir: Path,
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StartWorker]:
    """Factory: start ``llava-worker`` on the tiny config consuming ``queue``; returns (process, node)."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def start(
        queue: str | None, *extra_args: str, wait: bool = True, **env: str
    ) -> tuple[WorkerProcess, str]:
        """``queue=None``: the worker picks its queues from its settings (routing by model)."""
        hostname = f"t{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        queues = ["--queues", queue] if queue else []
        args = ["--config", str(TINY_CONFIG), *queues, "--hostname", hostname, *extra_args]
        environment = worker_env(client_settings, cache_dir, **env)
        worker = WorkerProcess(args, environment, logs / f"{hostname}.log")
        started.append(worker.start())
        if wait:
            worker.wait_ready(client.app, hostname)
        return worker, hostname

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def shared_worker(start_worker: StartWorker) -> tuple[WorkerProcess, str, str]:
    """One worker per test module on its own queue: (process, node name, queue)."""
    queue = f"it-{uuid.uuid4().hex[:8]}"
    worker, hostname = start_worker(queue)
    return worker, hostname, queue


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer().start()
    yield server
    server.stop()


@dataclass
class Stack:
    """A Redis of the test's own, a client on it, and the workers started on it (stopped with the test)."""

    redis: RedisServer
    client: LlavaClient
    start_worker: StartWorker
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self, queue: str, wait: bool = True, **env: str) -> tuple[WorkerProcess, str]:
        urls = {"LLAVA_BROKER_URL": self.client.settings.broker_url}
        urls["LLAVA_RESULT_BACKEND"] = self.client.settings.result_backend
        worker, hostname = self.start_worker(queue, wait=False, **env, **urls)
        self.workers.append(worker)
        if wait:
            worker.wait_ready(self.client.app, hostname)
        return worker, hostname


@pytest.fixture
def stack(tmp_path: Path, start_worker) -> Iterator[Stack]:
    server = RedisServer(data_dir=tmp_path / "redis").start()
    settings = ClientSettings(broker_url=server.url(0), result_backend=server.url(1), result_timeout=90)
    own = Stack(server, LlavaClient(settings), start_worker)
    try:
        yield own
    finally:
        for worker in own.workers:
            worker.stop(signal.SIGKILL)
        own.client.close()
        server.stop()
