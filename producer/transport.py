"""The Redis wire, two small subclasses: kombu's Redis transport with one reused client per channel, and
Celery's Redis result backend that subscribes to a job's result only when something waits for it.

kombu's Redis channel builds a new ``redis.Redis`` for every publish, event and acknowledgement
(``Channel.conn_or_acquire``), on the same connection pool each time; building one costs about as much as the
command it sends (redis-py copies its response-callback table per client). A py-spy profile of a worker
answering small jobs put ~12% of its consumer thread there. This channel keeps one client per connection pool
and hands it out instead: a ``redis.Redis`` takes a pooled connection per command, so sharing it between
threads is safe, and commands, timeouts and reconnects are exactly kombu's.

Used for ``redis://`` brokers (:func:`producer.app.celery_config`); any other broker URL keeps kombu's own
transport (``rediss://`` too: kombu turns TLS on by the transport's name).

Celery's Redis backend subscribes to every sent job's result channel as the job is sent; a web request that
answers 202 never waits, so the producer then had to unsubscribe again: two pub/sub commands per job for
nothing. :class:`ResultBackend` (the producer's, ``redis://`` and ``rediss://`` result backends) does not
subscribe on send; ``get``, ``wait`` and the collectors subscribe, then read the stored result, so a result
stored before the subscription is found all the same. Its ``forget`` also drops a late message of the
forgotten result (see :meth:`ResultBackend.forget`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:  # a reconnect replaces the pool
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel


class ResultBackend(RedisBackend):
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
RESULT_BACKENDS = {"redis": f"{__name__}:ResultBackend", "rediss": f"{__name__}:ResultBackend"}
