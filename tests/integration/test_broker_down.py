"""Redis down: every producer call (send, with a URL or an inline image through the blob store, a result read,
a wait, ``llava-queue status``) raises BrokerUnavailable within the client's broker_timeout + 1 s, both on a
dead port and on a server that accepts connections and never answers; the same client works again once
Redis is back on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.devstack import RedisServer, free_port
from producer import BrokerUnavailable, ClientSettings, LlavaClient
from producer.cli import EXIT_BROKER_UNAVAILABLE
from producer.cli import main as cli_main
from tests.integration.conftest import IMAGES

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

BROKER_TIMEOUT = 2.5  # above 2 s, so that the old per-attempt arithmetic (1.5 x broker_timeout) fails BOUND
BOUND = BROKER_TIMEOUT + 1.0  # the documented bound (broker_timeout) and a margin for one more attempt
URL = "https://images.example/cat.png"  # never fetched: no worker runs here
IMAGE = IMAGES / "stop_sign.jpg"  # sent inline: stored in the blob store first


def failure_within(bound: float, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` in a thread; it must end (return or raise) within ``bound`` s. Returns what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"still waiting on a dead Redis after {bound} s"
    return raised[0] if raised else None


@contextlib.contextmanager
def hung_redis() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers (a hung or blackholed Redis)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    listener.settimeout(0.1)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in [*accepted, listener]:
            conn.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, stopped and restarted by it (the session's Redis stays up)."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


def client_for(broker_url: str, result_backend: str) -> LlavaClient:
    settings = ClientSettings(
        broker_url=broker_url, result_backend=result_backend, broker_timeout=BROKER_TIMEOUT
    )
    return LlavaClient(settings)


async def _collect_async(client: LlavaClient, jobs: list[Any]) -> list[Any]:
    return [job async for job in client.as_completed_async(jobs, timeout=60)]


def assert_every_call_fails_fast(client: LlavaClient, sent: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each producer call on a Redis that does not answer raises BrokerUnavailable within BOUND."""
    monkeypatch.setenv("LLAVA_BROKER_URL", client.settings.broker_url)
    monkeypatch.setenv("LLAVA_RESULT_BACKEND", client.settings.result_backend)
    monkeypatch.setenv("LLAVA_BROKER_TIMEOUT", str(BROKER_TIMEOUT))
    calls: dict[str, Callable[[], Any]] = {
        "send": lambda: client.caption(URL, queue="down-test"),
        "send with job_id": lambda: client.caption(URL, queue="down-test", job_id="down-1"),
        "send inline": lambda: client.caption(IMAGE, queue="down-test"),
        "send inline with job_id": lambda: client.caption(IMAGE, queue="down-test", job_id="down-2"),
        "state": lambda: sent.state,
        "ready": sent.ready,
        "job(id).ready": lambda: client.job(sent.id).ready(),
        "get": lambda: sent.get(timeout=60),
        "wait": lambda: asyncio.run(sent.wait(timeout=60)),
        "as_completed": lambda: list(client.as_completed([sent], timeout=60)),
        "as_completed_async": lambda: asyncio.run(_collect_async(client, [sent])),
    }
    for name, call in calls.items():
        error = failure_within(BOUND, call)
        assert isinstance(error, BrokerUnavailable), f"{name}: {error!r}"
        assert error.code == "broker_unavailable" and error.retryable
    exit_code: list[int] = []
    assert failure_within(BOUND, lambda: exit_code.append(cli_main(["status"]))) is None
    assert exit_code == [EXIT_BROKER_UNAVAILABLE]


def test_dead_redis_fails_fast_and_typed_then_recovers(own_redis, monkeypatch) -> None:
    client = client_for(own_redis.url(0), own_redis.url(1))
    try:
        sent = client.caption(URL, queue="down-test")
        own_redis.stop()
        assert_every_call_fails_fast(client, sent, monkeypatch)

        own_redis.start()  # same port, same data (AOF)
        again = client.caption(URL, queue="down-test", job_id="after-restart")
        assert again.id == "after-restart" and client.job(sent.id).state == "PENDING"
        # The failed waits left no subscription behind (one would be unsubscribed from a dead Redis in
        # __del__).
        assert not sent.async_result.backend.result_consumer.subscribed_to
        waiting = redis.Redis.from_url(own_redis.url(0))
        try:
            queued = sum(waiting.llen(key) for key in waiting.scan_iter(match="down-test*"))
            assert queued == 2  # the send before the stop and the one after the restart
        finally:
            waiting.close()
    finally:
        client.close()


def test_hung_redis_fails_fast_and_typed(monkeypatch) -> None:
    with hung_redis() as url:
        client = client_for(f"{url}/0", f"{url}/1")
        try:
            assert_every_call_fails_fast(client, client.job("never-sent", "llava.caption"), monkeypatch)
        finally:
            client.close()


def test_a_send_the_broker_refused_releases_its_image_one_it_may_have_taken_keeps_it(own_redis) -> None:
    """Broker down, result backend (and blob store) up: the image is stored, the send fails. A broker that
    refused the connection took nothing: the claim is dropped at once. A hung one may take the push when it
    wakes (a primary that hung or died before replying): its job will need the image, so the claim stays
    (the blob's TTL ends it otherwise)."""
    backend = redis.Redis.from_url(own_redis.url(1))
    try:
        for broker, kept in ((f"redis://127.0.0.1:{free_port()}", False), (None, True)):
            backend.flushdb()
            with hung_redis() if broker is None else contextlib.nullcontext(broker) as url:
                client = client_for(f"{url}/0", own_redis.url(1))
                try:
                    error = failure_within(BOUND, lambda c=client: c.caption(IMAGE, queue="down-test"))
                    assert isinstance(error, BrokerUnavailable), repr(error)
                finally:
                    client.close()
            assert bool(list(backend.scan_iter(match="llava-blob-jobs-*"))) is kept, url
    finally:
        backend.close()
