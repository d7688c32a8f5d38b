"""The Redis wire, two small subclasses: kombu's Redis transport with one reused client per channel, and
Celery's Redis result backend that subscribes to a job's result only when something waits for it.

kombu's Redis channel builds a new ``redis.Redis`` for every publish, event and acknowledgement
(``Channel.conn_or_acquire``), on the same connection pool each time; building one costs about as much as the
command it sends (redis-py copies its response-callback table per client). A py-spy profile of a worker
answering small jobs put ~12% of its consumer thread there. This channel keeps one client per connection pool
and hands it out instead: a ``redis.Redis`` takes a pooled connection per command, so sharing it between
threads is safe, and commands, timeouts and reconnects are exactly kombu's.

Used for ``redis://`` brokers, and through :mod:`producer.sentinel` for ``sentinel://`` ones
(:func:`producer.app.celery_config`); any other broker URL keeps kombu's own transport (``rediss://`` too:
kombu turns TLS on by the transport's name). Both put back a job Redis popped but would not record as
unacknowledged (:class:`QoS`).

Celery's Redis backend subscribes to every sent job's result channel as the job is sent; a web request that
answers 202 never waits, so the producer then had to unsubscribe again: two pub/sub commands per job for
nothing. :class:`ResultBackend` (the producer's ``redis://``, ``rediss://`` and, as
:class:`SentinelResultBackend`, ``sentinel://`` result backends) does not subscribe on send; ``get``, ``wait``
and the collectors subscribe, then read the stored result, so a result stored before the subscription is
found all the same. Its ``forget`` also drops a late message of the forgotten result
(see :meth:`ResultBackend.forget`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery.backends.redis import RedisBackend
from celery.backends.redis import ResultConsumer as CeleryResultConsumer
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class SharedClient:
    """The channel mixin: one client per connection pool, handed out for every command; and a channel whose
    kombu connection was closed under it (a channel still restoring its unacknowledged jobs as the consumer
    reconnects, after a Sentinel failover say) raises a connection error, which the consumer recovers from
    (kombu reads the closed connection's address: an AttributeError stops the worker)."""

    _shared_client: Any = None
    pool: Any
    connection: Any
    _create_client: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:  # a reconnect replaces the pool
            shared = self._shared_client = self._create_client()
        yield shared


class _Orphans:
    """Jobs that BRPOP took off their queue and whose unacknowledged copy Redis then refused: its primary
    died, hung or failed over between the pop and that write (kombu makes them in two steps), or it is full.
    The popped copy in this process is the only one left: it goes back on its queue before this process
    consumes again (a job sent just before its primary was killed was lost there, in the failover drill)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[Any, str, str]] = []

    def keep(self, message: Any) -> None:
        delivery = message.delivery_info
        headers = message._raw.get("headers") if isinstance(message._raw, dict) else None
        job = headers.get("id") if isinstance(headers, dict) else None
        log.error("job %s was taken off its queue but not recorded: held here until it can be put back", job)
        with self._lock:
            self._held.append((message._raw, delivery["exchange"], delivery["routing_key"]))

    def requeue(self, channel: Any) -> None:
        """Put the held jobs back (at the head of their queues); a Redis error keeps them held and is raised
        as a connection error, so that the consumer pauses and reconnects rather than pop more jobs."""
        with self._lock:
            held, self._held = self._held, []
        if not held:
            return
        try:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                for payload, exchange, routing_key in held:
                    channel._do_restore_message(payload, exchange, routing_key, pipe)
                pipe.execute()
        except Exception as exc:
            with self._lock:
                self._held = held + self._held
            raise redis.ConnectionError(
                f"{len(held)} popped job(s) not back on their queue yet: {exc}"
            ) from exc
        log.warning("put %d job(s) back on their queue: Redis refused their unacknowledged copy", len(held))


ORPHANS = _Orphans()


class QoS(kombu_redis.QoS):
    """kombu's acknowledgement emulation, except that a job whose unacknowledged copy Redis refused is kept
    (:class:`_Orphans`). A refusal that passes (a connection lost, a full Redis) is raised as a connection
    error, so that the consumer reconnects and puts the job back; any other is raised as it is, after the
    job is put back, and stops the worker (non-zero: a supervisor sees it)."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        try:
            super().append(message, delivery_tag)
        except Exception as exc:
            ORPHANS.keep(message)
            if isinstance(exc, (redis.exceptions.OutOfMemoryError, *self.channel.connection_errors)):
                refused = f"Redis refused a popped job's unacknowledged copy: {exc}"
                raise redis.ConnectionError(refused) from exc
            ORPHANS.requeue(self.channel)  # a refusal that lasts (an ACL, say): put it back, then stop
            raise


class RequeuesOrphans:
    """The channel mixin that puts orphaned jobs back before it consumes."""

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        ORPHANS.requeue(self)
        return super().basic_consume(queue, *args, **kwargs)  # type: ignore[misc]


class Channel(RequeuesOrphans, SharedClient, kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


POLL_EVERY_S = 2.0  # how often a waiting result subscription also reads the stored results


class ResultConsumer(CeleryResultConsumer):
    """Celery's result subscription, which also reads the stored results it waits for every
    :data:`POLL_EVERY_S` seconds (one MGET). A hung primary keeps the subscription's socket open and
    silent, which looks like no result yet, while the results are stored on the promoted replica: the read
    finds them there (through the Sentinels), and its timing out on the hung one reconnects the subscription
    as Celery does after a connection error. (A PING on the subscription would do the first part only, and
    redis-py's own health checks share its socket with the results: a result read while cleaning their
    replies raises.)"""

    _polled_at = 0.0

    def drain_events(self, timeout: float | None = None) -> None:
        now = time.monotonic()
        if now - self._polled_at >= POLL_EVERY_S:
            self._polled_at = now
            self._read_stored()
        super().drain_events(timeout)

    def _read_stored(self) -> None:
        with self._locked():
            keys = list(self.subscribed_to) if self._pubsub is not None else []
        if not keys:
            return
        metas: list[Any] = []
        with self.reconnect_on_error():
            metas = self.backend.client.mget(keys)
        for meta in metas or []:
            if meta:
                self.on_state_change(self._decode_result(meta), None)


class ResultBackend(RedisBackend):
    ResultConsumer = ResultConsumer

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Celery subscribes here to the sent job's channel; this backend waits until something waits."""

    def forget(self, task_id: str) -> None:
        """Celery's ``forget`` (the stored result, the cached one, the subscription), then any message of the
        forgotten result still on its way to this client. A result published while the client was subscribed
        stays in its socket, ahead of the UNSUBSCRIBE reply, when the client unsubscribed before reading it
        (a ``get`` that found the result stored): a job sent again under the same id would take that message
        of its first run (found under load: a failed job's resend returned the old failure). So the messages
        up to that reply are read (within one attempt, ``redis_socket_timeout``), and what came for this id
        is dropped."""
        super().forget(task_id)
        consumer = self.result_consumer
        key = self.get_key_for_task(task_id)
        deadline = time.monotonic() + float(self.app.conf.redis_socket_timeout or 1.0)
        while _unsubscribing(consumer, key) and (left := deadline - time.monotonic()) > 0:
            consumer.drain_events(timeout=min(left, 0.1))
        with consumer._locked():  # a draining thread may be buffering messages meanwhile
            dropped = self._pending_messages.pop(task_id, None)  # read while nothing waited for it
            if dropped is not None:
                self._pending_messages.total -= len(dropped)  # as Celery's own clean-up does


def _unsubscribing(consumer: Any, key: bytes) -> bool:
    """Whether ``key``'s UNSUBSCRIBE is still to be sent or its reply still to be read."""
    pubsub = consumer._pubsub
    pending = consumer._pending_unsubscribe
    return pubsub is not None and (key in pending or key in pubsub.pending_unsubscribe_channels)


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = "producer.sentinel:SentinelTransport"
RESULT_BACKENDS = {
    "redis": f"{__name__}:ResultBackend",
    "rediss": f"{__name__}:ResultBackend",
    "sentinel": "producer.sentinel:SentinelResultBackend",
}
