"""Which Redis memory policies keep accepted jobs: the one place producer and worker read and judge them.

Queued messages, the images of the blob store, the delivery ledger and results are plain Redis keys. A Redis
that evicts keys when it reaches ``maxmemory`` drops them without a trace: ``allkeys-*`` any of them,
``volatile-*`` those with a TTL (blobs, ledger, results). Only ``noeviction`` keeps them: a full Redis then
refuses new writes, and a send fails with :class:`~producer.errors.BrokerFull` instead of a job being lost.
Without ``maxmemory`` (0) nothing is evicted, whatever the policy.

The policy is read with ``CONFIG GET maxmemory*``; managed Redis services often refuse ``CONFIG``, so then
``INFO memory`` (``maxmemory``, ``maxmemory_policy``); a Redis that answers neither is not judged (a debug
line says so). The worker refuses to start on an evicting Redis (``worker.redis_policy``); the producer
warns once per client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from producer.app import backend_client
from producer.contract import is_redis_url

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"  # the only maxmemory-policy that never drops a key


@dataclass(frozen=True)
class MemoryPolicy:
    """A Redis's ``maxmemory-policy`` and ``maxmemory`` (bytes; 0: no limit)."""

    policy: str
    maxmemory: int

    @property
    def evicts(self) -> bool:
        """Whether this Redis may drop keys (queued jobs, images, results) when it is full."""
        return self.maxmemory > 0 and self.policy != SAFE_POLICY

    def __str__(self) -> str:
        return f"maxmemory-policy {self.policy}, maxmemory {self.maxmemory} bytes"


def read_memory_policy(client: redis.Redis) -> MemoryPolicy | None:
    """``client``'s Redis memory policy: from ``CONFIG GET``, else ``INFO memory``, else None (a debug
    line). Connection failures propagate."""
    try:
        config: Any = client.config_get("maxmemory*")
        return MemoryPolicy(_text(config["maxmemory-policy"]), int(config["maxmemory"]))
    except (redis.ResponseError, KeyError, ValueError) as exc:  # CONFIG renamed or denied (managed Redis)
        refused = exc
    try:
        info = client.info("memory")
        return MemoryPolicy(_text(info["maxmemory_policy"]), int(info["maxmemory"]))
    except (redis.ResponseError, KeyError, ValueError) as exc:
        log.debug("Redis memory policy unknown: CONFIG GET refused (%s), INFO memory too (%s)", refused, exc)
        return None


def evicting_redis(app: Celery, timeout: float) -> dict[str, MemoryPolicy]:
    """The Redis servers of ``app`` (``broker``, ``result backend``) whose policy evicts keys, each read
    within about ``timeout`` seconds; one that cannot be read is left out (a debug line)."""
    evicting: dict[str, MemoryPolicy] = {}
    for role, connect in (("broker", _broker_client), ("result backend", _backend_client)):
        try:
            with connect(app, timeout) as client:
                policy = None if client is None else read_memory_policy(client)
        except Exception as exc:  # a judgement only: never fail a send or a start because of it
            log.debug("could not read the %s Redis's memory policy: %s", role, exc)
            continue
        if policy is not None and policy.evicts:
            evicting[role] = policy
    return evicting


def eviction_message(evicting: dict[str, MemoryPolicy]) -> str:
    """What is wrong with ``evicting`` (from :func:`evicting_redis`) and how to fix it."""
    shown = "; ".join(f"{role}: {policy}" for role, policy in evicting.items())
    safe = SAFE_POLICY
    return (
        f"Redis evicts keys when full ({shown}): queued jobs, their images and results can be dropped "
        f"without a trace; set maxmemory-policy {safe} (redis-server --maxmemory-policy {safe}, CONFIG SET "
        f"maxmemory-policy {safe}, or the managed service's parameter), so that a full Redis refuses new "
        "sends (broker_full) instead"
    )


@contextlib.contextmanager
def _broker_client(app: Celery, timeout: float) -> Iterator[redis.Redis | None]:
    """A client on the broker's Redis (kombu's own channel, so Sentinel and TLS are as the app has them),
    every connect and command bounded by ``timeout``, one attempt."""
    if not is_redis_url(str(app.conf.broker_url or "")):
        yield None
        return
    bounded = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 1}
    bounded |= {"interval_start": 0, "connect_retries_timeout": timeout}
    connection = app.connection_for_write(connect_timeout=timeout, transport_options=bounded)
    with connection, connection.default_channel.conn_or_acquire() as client:
        yield client


@contextlib.contextmanager
def _backend_client(app: Celery, timeout: float) -> Iterator[redis.Redis | None]:
    """A client of its own on the result backend's Redis (as the backend connects: Sentinel, TLS), bounded
    by ``timeout``, one attempt; None for a backend that is not Redis."""
    client = backend_client(app.backend, timeout)
    try:
        yield client
    finally:
        if client is not None:
            client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
