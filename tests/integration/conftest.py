"""Integration fixtures: a real redis-server on a free port, real worker subprocesses, the tiny checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devtools.devstack import RedisServer, WorkerProcess, stop_all
from producer import LlavaClient
from producer.app import worker_health
from producer.settings import ClientSettings
from tests.integration.image_server import ImageServer

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


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the test module's own, no worker on it: its command counts move only with what a test sends
    (the session's Redis also carries its workers' heartbeats)."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis-quiet")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where workers build (once) and find the tiny checkpoints: ``LLAVA_TEST_CACHE_DIR``, else one directory
    for the run that its pytest-xdist processes share (a checkpoint is built aside, then renamed in place)."""
    configured = os.environ.get("LLAVA_TEST_CACHE_DIR")
    if configured:
        path = Path(configured)
    else:
        run = tmp_path_factory.getbasetemp()
        path = (run.parent if os.environ.get("PYTEST_XDIST_WORKER") else run) / "llava-cache"
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
        LLAVA_SHUTDOWN_GRACE="1",  # test workers stop in a second (tests of the grace set their own)
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


StartWorker = Callable[..., tuple[WorkerProcess, str]]
_LIVE: list[WorkerProcess] = []  # every worker this test process started (for the stacks of a failure)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the thread stacks of the workers still running (a job that never
    finished shows where it waits)."""
    report = yield
    if report.when == "call" and report.failed:
        running = [worker for worker in _LIVE if worker.process and worker.process.poll() is None]
        stacks = _worker_stacks(running)
        if stacks:
            report.sections.append(("thread stacks of the running workers (SIGUSR1)", stacks))
    return report


def _worker_stacks(live: list[WorkerProcess], wait: float = 5.0) -> str:
    """Celery's SIGUSR1 handler logs every thread's stack; collect what each live worker logs, within
    ``wait`` seconds in all."""
    sizes = {}
    for worker in live:
        try:  # a worker that exited meanwhile has nothing to tell: skip it, never fail the run here
            sizes[id(worker)] = worker.log_path.stat().st_size
            os.kill(worker.process.pid, signal.SIGUSR1)  # type: ignore[union-attr]
        except OSError:
            sizes.pop(id(worker), None)
    live = [worker for worker in live if id(worker) in sizes]
    deadline = time.monotonic() + wait
    dumps = []
    for worker in live:
        text = ""
        while time.monotonic() < deadline:
            with open(worker.log_path, "rb") as log:
                log.seek(sizes[id(worker)])
                text = log.read().decode(errors="replace")
            if "LOCAL VARIABLES" in text:  # the end of Celery's dump
                break
            time.sleep(0.1)
        dumps.append(f"--- {worker.log_path.name}\n{text[-20_000:]}")
    return "\n".join(dumps)


@dataclass
class Workers:
    """The worker subprocesses of the session: those a module started stop with it, the pool's at the end."""

    client: LlavaClient
    settings: ClientSettings
    cache_dir: Path
    logs: Path
    started: list[WorkerProcess] = field(default_factory=list)
    pooled: dict[tuple[tuple[str, str], ...], tuple[WorkerProcess, str, str]] = field(default_factory=dict)

    def start(
        self, queue: str | None, *extra_args: str, wait: bool = True, **env: str
    ) -> tuple[WorkerProcess, str]:
        """``llava-worker`` on the tiny config; ``queue=None``: it picks its queues from its settings."""
        hostname = f"t{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        queues = ["--queues", queue] if queue else []
        args = ["--config", str(TINY_CONFIG), *queues, "--hostname", hostname, *extra_args]
        environment = worker_env(self.settings, self.cache_dir, **env)
        worker = WorkerProcess(args, environment, self.logs / f"{hostname}.log", fork=True)
        self.started.append(worker.start())
        _LIVE.append(worker)
        if wait:
            worker.wait_ready(self.client.app, hostname)
        return worker, hostname

    def shared(self, **env: str) -> tuple[WorkerProcess, str, str]:
        """One worker per distinct ``env`` for the whole session, on a queue of its own."""
        key = tuple(sorted(env.items()))
        if key not in self.pooled:
            queue = f"it-{uuid.uuid4().hex[:8]}"
            self.pooled[key] = (*self.start(queue, **env), queue)
        return self.pooled[key]

    def stop_since(self, mark: int) -> None:
        """Stop, together, the workers started after ``mark`` that are not in the pool."""
        pooled = {id(worker) for worker, _, _ in self.pooled.values()}
        stop_all([worker for worker in self.started[mark:] if id(worker) not in pooled])


@pytest.fixture(scope="session")
def workers(
    client: LlavaClient,
    client_settings: ClientSettings,
    cache_dir: Path,
    tiny_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Workers]:
    every = Workers(client, client_settings, cache_dir, tmp_path_factory.mktemp("worker-logs"))
    yield every
    stop_all(every.started)


@pytest.fixture(scope="module")
def start_worker(workers: Workers) -> Iterator[StartWorker]:
    """Factory: start ``llava-worker`` on the tiny config consuming ``queue``; returns (process, node).
    The workers a module starts are stopped together when the module ends."""
    mark = len(workers.started)
    yield workers.start
    workers.stop_since(mark)


@pytest.fixture(scope="session")
def shared_worker(workers: Workers) -> tuple[WorkerProcess, str, str]:
    """The session's worker with the default settings, on its own queue: (process, node name, queue)."""
    return workers.shared()


@pytest.fixture(scope="session")
def fetching_worker(workers: Workers) -> tuple[WorkerProcess, str, str]:
    """The session's worker that may fetch from the loopback image server and does not retry a failed fetch:
    (process, node name, queue)."""
    return workers.shared(LLAVA_FETCH_ALLOW="127.0.0.1/32", LLAVA_FETCH_RETRIES="0")


WorkerCli = Callable[..., tuple[int, str]]


@pytest.fixture
def worker_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    client_settings: ClientSettings,
    cache_dir: Path,
) -> WorkerCli:
    """``llava-worker --config tiny.yaml ARGS`` run in this process with the test workers' environment plus
    ``env``: (exit status, what it printed and logged). For start-up refusals, which end before it serves."""
    from worker.cli import main

    def run(*args: str, **env: str) -> tuple[int, str]:
        for key in [key for key in os.environ if key.startswith("LLAVA_")]:
            monkeypatch.delenv(key)
        for key, value in worker_env(client_settings, cache_dir, **env).items():
            monkeypatch.setenv(key, value)
        hostname = f"refused-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        status = main(["--config", str(TINY_CONFIG), "--hostname", hostname, *args])
        printed = capsys.readouterr()
        return status, printed.out + printed.err + caplog.text

    return run


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def health(client: LlavaClient, hostname: str, timeout: float = 2.0) -> dict[str, Any]:
    """``hostname``'s health, ``{}`` if it does not answer within ``timeout`` (returns with its reply)."""
    return worker_health(client.app, timeout, nodes=[hostname]).get(hostname, {})


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


@contextmanager
def stack_on(
    server: RedisServer, settings: ClientSettings, start_worker: StartWorker, *others: RedisServer
) -> Iterator[Stack]:
    """A :class:`Stack` on ``server`` (and the ``others`` the settings name); its workers killed, its
    client closed and the servers stopped at the end."""
    own = Stack(server, LlavaClient(settings), start_worker)
    try:
        yield own
    finally:
        stop_all(own.workers, signal.SIGKILL)
        own.client.close()
        for each in (server, *others):
            each.stop()


@pytest.fixture
def stack(tmp_path: Path, start_worker) -> Iterator[Stack]:
    server = RedisServer(data_dir=tmp_path / "redis").start()
    settings = ClientSettings(broker_url=server.url(0), result_backend=server.url(1), result_timeout=90)
    with stack_on(server, settings, start_worker) as own:
        yield own
