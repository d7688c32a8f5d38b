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
stored before the subscription is found all the same.
"""

from __future__ import annotations

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


TRANSPORT = f"{__name__}:Transport"
RESULT_BACKENDS = {"redis": f"{__name__}:ResultBackend", "rediss": f"{__name__}:ResultBackend"}
