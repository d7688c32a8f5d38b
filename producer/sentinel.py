"""Redis Sentinel on both sides: kombu's Sentinel transport and Celery's Sentinel result backend with what
:mod:`producer.transport` adds on ``redis://`` (one client per channel, orphaned jobs put back, a result
subscription that notices a hung Redis), and what a failover needs so that nothing is lost: connections that
keep every pool of the process on the current primary (:class:`FailoverConnection`), and writes confirmed by
a replica (:class:`ReplicaAck`). ``LLAVA_SENTINEL_MASTER`` selects them (:func:`producer.app.celery_config`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import redis
from celery.backends.redis import SentinelBackend
from kombu.transport import redis as kombu_redis
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

from producer.transport import QoS, RequeuesOrphans, ResultBackend, SharedClient

log = logging.getLogger(__name__)


class FailoverConnection(SentinelManagedConnection):
    """A connection to the master a Sentinel named, which keeps every pool of this process on one master.

    redis-py asks the Sentinels for the master only when a connection connects, and a pool drops its idle
    connections to an old master only when one of its own connections finds the new one. kombu keeps two pools
    per channel (BRPOP, and everything else), Celery's result backend and the blob store one each, so after a
    failover a pool whose connections are idle hands them out still, to a primary that is hung or demoted; a
    popped job's unacknowledged copy written through one times out, and the job is gone. So a connection that
    finds a new master moves every pool of the same service to it, and one whose command times out or breaks
    disconnects their idle connections (made again, each asks the Sentinels)."""

    _pools: ClassVar[weakref.WeakSet[Any]] = weakref.WeakSet()
    _pools_lock: ClassVar[threading.Lock] = threading.Lock()  # pools join while others are walked

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)
        pool = self.connection_pool.connection_pool_ref()  # the pool's proxy holds it weakly
        if pool is not None:
            with FailoverConnection._pools_lock:
                FailoverConnection._pools.add(pool)
        self._follow(address)

    def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().send_packed_command(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            self._follow(None)
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            self._follow(None)
            raise

    def _follow(self, master: tuple[str, int] | None) -> None:
        """Pools of this service on another master than ``master`` (None: whatever master they are on) drop
        their idle connections; in-use ones are dropped as they come back (redis-py's ``owns_connection``)."""
        service = self.connection_pool.service_name
        with FailoverConnection._pools_lock:
            pools = list(FailoverConnection._pools)
        for pool in pools:
            if pool.service_name != service or not pool.is_master:
                continue
            if master is None or pool.proxy.master_address not in (None, master):
                if master is not None:
                    pool.proxy.master_address = master
                pool.disconnect(inuse_connections=False)


class FailoverSSLConnection(FailoverConnection, SentinelManagedSSLConnection):
    pass


REPLICA_ACK_MS = 200  # how long a write under Sentinel waits for a replica to confirm it (WAIT)
NO_REPLICA_PAUSE = 5.0  # seconds without WAITs after none confirmed: no replica is there to wait for


class ReplicaAck:
    """``WAIT 1`` after a write that must survive a failover: Redis replicates asynchronously, so a job sent
    just before its primary was killed was acknowledged to the producer and lost with it (seen in the
    failover drill). When no replica confirms within :data:`REPLICA_ACK_MS`, there is none to wait for:
    writes go on without waiting for :data:`NO_REPLICA_PAUSE` seconds, and a warning says so (once)."""

    def __init__(self) -> None:
        self._skip_until = 0.0
        self._warned = False

    def wanted(self) -> bool:
        return time.monotonic() >= self._skip_until

    def command(self) -> tuple[str, int, int]:
        return ("WAIT", 1, REPLICA_ACK_MS)

    def record(self, acks: Any) -> None:
        if isinstance(acks, int) and acks >= 1:
            self._warned = False
            return
        self._skip_until = time.monotonic() + NO_REPLICA_PAUSE
        if not self._warned:
            self._warned = True
            log.warning(
                "no Redis replica confirmed a write within %d ms: a failover now would lose it",
                REPLICA_ACK_MS,
            )


class SentinelChannel(RequeuesOrphans, SharedClient, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with :class:`FailoverConnection` and a publish that waits for a replica."""

    QoS = QoS
    connection_class = FailoverConnection
    connection_class_ssl: Any = FailoverSSLConnection
    replica_ack = ReplicaAck()  # one per process: whether a replica answers is the cluster's state
    _pinned = threading.local()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        pinned = getattr(self._pinned, "client", None)
        if client is None and pinned is not None:
            yield pinned
            return
        with super().conn_or_acquire(client) as acquired:
            yield acquired

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """kombu's publish on one connection of its own, then ``WAIT`` on it (WAIT counts that connection's
        writes only)."""
        if kwargs.get("_publish_batch") is not None or not self.replica_ack.wanted():
            super()._put(queue, message, **kwargs)
            return
        client = self.Client(connection_pool=self.pool, single_connection_client=True)
        self._pinned.client = client
        try:
            super()._put(queue, message, **kwargs)
            self.replica_ack.record(client.execute_command(*self.replica_ack.command()))
        finally:
            self._pinned.client = None
            client.close()


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


class SentinelFailover:
    """The mixin of a result backend on Celery's ``SentinelBackend``: its connections (the blob store's
    too, built from its ``connparams``) are :class:`FailoverConnection`."""

    connection_class_ssl = FailoverSSLConnection
    connparams: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connparams.setdefault("connection_class", FailoverConnection)


class SentinelResultBackend(SentinelFailover, ResultBackend, SentinelBackend):
    """:class:`ResultBackend` on Celery's Sentinel backend (the master looked up through the Sentinels)."""
