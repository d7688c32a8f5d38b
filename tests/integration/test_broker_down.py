"""Redis down: sending and reading results raise BrokerUnavailable within the client's broker_timeout (a
generous bound on the wait), and the same client works again once Redis is back on the same port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import BrokerUnavailable, ClientSettings, LlavaClient
from worker.devstack import RedisServer

BROKER_TIMEOUT = 2.0
BOUND = 4 * BROKER_TIMEOUT  # generous: before the fix these waits took 19 s and 368 s
URL = "https://images.example/cat.png"  # never fetched: no worker runs here


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


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, stopped and restarted by it (the session's Redis stays up)."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def fast_client(own_redis: RedisServer) -> Iterator[LlavaClient]:
    settings = ClientSettings(
        broker_url=own_redis.url(0), result_backend=own_redis.url(1), broker_timeout=BROKER_TIMEOUT
    )
    client = LlavaClient(settings)
    yield client
    client.close()


async def _collect_async(client: LlavaClient, jobs: list[Any]) -> list[Any]:
    return [job async for job in client.as_completed_async(jobs, timeout=60)]


def test_redis_down_fails_fast_and_typed_then_recovers(own_redis, fast_client) -> None:
    client = fast_client
    sent = client.caption(URL, queue="down-test")
    own_redis.stop()
    calls: dict[str, Callable[[], Any]] = {
        "send": lambda: client.caption(URL, queue="down-test"),
        "send with job_id": lambda: client.caption(URL, queue="down-test", job_id="down-1"),
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

    own_redis.start()  # same port, same data (AOF)
    again = client.caption(URL, queue="down-test", job_id="after-restart")
    assert again.id == "after-restart" and client.job(sent.id).state == "PENDING"
    # The failed waits left no subscription behind (one would be unsubscribed from a dead Redis in __del__).
    assert not sent.async_result.backend.result_consumer.subscribed_to
    waiting = redis.Redis.from_url(own_redis.url(0))
    try:
        queued = sum(waiting.llen(key) for key in waiting.scan_iter(match="down-test*"))
        assert queued == 2  # the send before the stop and the one after the restart
    finally:
        waiting.close()
