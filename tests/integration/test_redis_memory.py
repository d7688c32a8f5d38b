"""Redis memory on a real redis-server: a full Redis (``noeviction``) refuses a send with a typed, retryable
``broker_full`` on every path (publish, image upload, image claim); a Redis that evicts keys when full makes
the producer warn once and the worker refuse to start; the policy is read from ``CONFIG GET``, else
``INFO memory``, else not judged."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.devstack import RedisServer
from producer import ClientSettings, LlavaClient, ResourceExhausted
from producer.blobs import RedisBlobStore
from producer.errors import BrokerFull
from producer.memory_policy import MemoryPolicy, read_memory_policy
from tests.integration.conftest import IMAGES, WorkerCli

URL = "https://images.example/cat.png"  # never fetched: no worker consumes these queues


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, reconfigured by it (CONFIG SET)."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    yield server
    server.stop()


def client_for(server: RedisServer, **settings: object) -> LlavaClient:
    return LlavaClient(
        ClientSettings(broker_url=server.url(0), result_backend=server.url(1), broker_timeout=2.5, **settings)
    )


def fill(server: RedisServer) -> redis.Redis:
    """Write 2 MB into ``server``, then cap it 1 MB below what it holds (``noeviction``): nothing here
    expires or deletes, so it stays over the cap and refuses every write that needs memory. (A cap just
    above what it held would not do: Redis does not count its AOF buffer, which shrinks as it is written.)"""
    admin = redis.Redis.from_url(server.url(0))
    for index in range(32):
        admin.set(f"fill-{index}", b"x" * 65_536)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 1_000_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("one-more", b"x")
    return admin


def assert_broker_full(raised: pytest.ExceptionInfo[BaseException], what: str) -> None:
    error = raised.value
    assert isinstance(error, BrokerFull) and isinstance(error, ResourceExhausted), repr(error)
    assert error.code == "broker_full" and error.retryable
    assert what in error.message and "Redis is out of memory" in error.message, error.message


def test_a_full_redis_refuses_each_send_with_broker_full(own_redis: RedisServer) -> None:
    client, inline_client = client_for(own_redis), client_for(own_redis, blob_store="off")
    queue = f"unconsumed-{uuid.uuid4().hex[:8]}"
    stored = (IMAGES / "stop_sign.jpg").read_bytes()
    client.caption(stored, queue=queue)  # its resend below only claims the stored copy
    admin = fill(own_redis)
    new_image = (IMAGES / "radar_chart.png").read_bytes()
    sends = {
        "sending a llava.caption job": lambda: client.caption(URL, queue=queue),  # the publish
        "storing the image in the blob store": lambda: client.caption(new_image, queue=queue),  # upload
        "storing the image": lambda: client.vqa(stored, "What is it?", queue=queue),  # claim of a resend
        "sending a llava.vqa job": lambda: inline_client.vqa(new_image, "What is it?", queue=queue),
    }
    for what, send in sends.items():
        with pytest.raises(BrokerFull) as raised:
            send()
        assert_broker_full(raised, what)
    blob, claims = RedisBlobStore.keys(hashlib.sha256(new_image).hexdigest())
    backend = redis.Redis.from_url(own_redis.url(1))
    assert not backend.exists(blob, claims), "a refused send leaves nothing of its image"
    admin.config_set("maxmemory", 0)  # room again: the same client sends
    assert client.caption(new_image, queue=queue).id
    client.close(), inline_client.close()


def evicting(server: RedisServer, policy: str = "volatile-lru") -> None:
    admin = redis.Redis.from_url(server.url(0))
    admin.config_set("maxmemory", 1 << 30)
    admin.config_set("maxmemory-policy", policy)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "evicts" in r.getMessage()
    ]


def test_the_producer_warns_once_per_client_on_an_evicting_redis(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    queue = f"unconsumed-{uuid.uuid4().hex[:8]}"
    client = client_for(own_redis)
    client.caption(URL, queue=queue)  # noeviction (the test servers' policy): nothing to say
    assert warnings_of(caplog) == []
    evicting(own_redis)
    client = client_for(own_redis)
    for _ in range(3):
        client.caption(URL, queue=queue)
    [warning] = warnings_of(caplog)
    assert "maxmemory-policy volatile-lru" in warning and "set maxmemory-policy noeviction" in warning
    assert "broker:" in warning and "result backend:" in warning
    client.close()


def test_a_worker_refuses_to_start_on_an_evicting_redis(
    own_redis: RedisServer, worker_cli: WorkerCli
) -> None:
    """Refused before it loads a model: the CLI runs in-process."""
    evicting(own_redis, "allkeys-lru")
    status, output = worker_cli(LLAVA_BROKER_URL=own_redis.url(0), LLAVA_RESULT_BACKEND=own_redis.url(1))
    assert status == 1, output
    assert "llava-worker: cannot start" in output and "maxmemory-policy allkeys-lru" in output
    assert "set maxmemory-policy noeviction" in output


def test_the_policy_is_read_from_config_else_info_else_not_judged(own_redis: RedisServer) -> None:
    evicting(own_redis)
    admin = redis.Redis.from_url(own_redis.url(0))
    expected = MemoryPolicy("volatile-lru", 1 << 30)
    assert read_memory_policy(admin) == expected
    everything = {"enabled": True, "passwords": ["+pw"], "keys": ["*"], "channels": ["*"]}
    admin.acl_setuser("managed", commands=["+@all", "-config"], **everything)  # a managed Redis's user
    admin.acl_setuser("locked", commands=["+@all", "-config", "-info"], **everything)
    as_user = {
        name: redis.Redis.from_url(own_redis.url(0), username=name, password="pw")
        for name in ("managed", "locked")
    }
    assert read_memory_policy(as_user["managed"]) == expected
    assert read_memory_policy(as_user["locked"]) is None
