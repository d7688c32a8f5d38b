"""The worker's start check of its Redis memory policy: it refuses to serve from a Redis that evicts keys
when full (the policies themselves are judged in :mod:`producer.memory_policy`, shared with the producer)."""

from __future__ import annotations

from celery import Celery

from producer.memory_policy import evicting_redis, eviction_message

POLICY_READ_TIMEOUT = 5.0  # seconds per Redis operation of the check: a hung Redis does not hold the start


def refuse_evicting_redis(app: Celery, timeout: float = POLICY_READ_TIMEOUT) -> None:
    """Raise ``StartupError`` if the broker's or the result backend's Redis has a ``maxmemory`` and a policy
    that evicts keys: jobs this worker accepted could vanish from it without a trace. A Redis that does not
    say (``CONFIG`` and ``INFO`` refused, or not answering) is not held against the start."""
    from worker.runtime import StartupError  # the runtime package imports torch: only when starting

    evicting = evicting_redis(app, timeout)
    if evicting:
        raise StartupError(f"{eviction_message(evicting)}; this worker does not start on such a Redis")
