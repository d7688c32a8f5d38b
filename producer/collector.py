"""Collect jobs in the order they finish, without polling each one and without leaking subscriptions.

On a Redis result backend Celery publishes every stored result on a pub/sub channel named after the job.
:class:`ResultCollector` registers each job with the backend's result consumer (which subscribes to its
channel), then waits on that one pub/sub connection: a finished job wakes it at once, whatever the number of
jobs. A job leaves the consumer as soon as it finished (Celery unsubscribes its channel) or is discarded, so
a long-lived process keeps no subscription for a job nobody waits on any more. Backends without a result
consumer are polled every ``_POLL_INTERVAL`` seconds.

Celery gives each thread its own backend (``app.backend`` is thread-local) and a handle stays bound to the
backend of the thread that made it, so the collector waits on the handles' own backends, from any thread:
:func:`aiter_completed` runs :func:`iter_completed` in an executor thread for asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from celery.result import AsyncResult

from producer.errors import ResultTimeout
from producer.job import Job

_WAIT_SLICE = 1.0  # longest single wait on the pub/sub socket; jobs added meanwhile are seen after it
_POLL_INTERVAL = 0.5  # seconds between two looks at a backend without a result consumer


class ResultCollector:
    """Hands back jobs as they finish; jobs may be added while it runs (a bounded in-flight window).

    ``add(job)`` starts watching a job, ``next_done(timeout)`` returns the next finished one (its result is
    then in the handle: ``job.get()`` returns or raises at once), ``discard(job)`` stops watching one,
    ``close()`` stops watching all. Use one collector from one thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[Job[Any]]] = {}
        self._done: deque[Job[Any]] = deque()

    def __len__(self) -> int:
        """Jobs added and not yet handed back (finished ones included)."""
        with self._lock:
            return sum(len(jobs) for jobs in self._pending.values()) + len(self._done)

    @property
    def pending(self) -> int:
        """Jobs still running (or queued)."""
        with self._lock:
            return sum(len(jobs) for jobs in self._pending.values())

    def add(self, job: Job[Any]) -> None:
        """Watch ``job``. A job that already finished is handed back by the next :meth:`next_done`."""
        result = job.async_result
        if result.on_ready.ready:  # its result is already in the handle
            with self._lock:
                self._done.append(job)
            return
        with self._lock:
            self._pending.setdefault(job.id, []).append(job)
        # Register (and subscribe) first, then look: a result stored before the subscription is found by
        # the look, one stored after it arrives on the channel. ``then`` fires at once for a buffered one.
        result.then(self._finished)
        result.ready()

    def _finished(self, result: AsyncResult) -> None:
        with self._lock:
            self._done.extend(self._pending.pop(result.id, []))

    def next_done(self, timeout: float | None = None) -> Job[Any] | None:
        """The next finished job, or ``None`` if none finished within ``timeout`` seconds (``None``: no limit)
        or no job is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._done:
                    return self._done.popleft()
                if not self._pending:
                    return None
            remaining = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._wait(min(remaining, _WAIT_SLICE))

    def _wait(self, seconds: float) -> None:
        with self._lock:
            firsts = [jobs[0].async_result for jobs in self._pending.values()]
        backends = list({id(result.backend): result.backend for result in firsts}.values())
        consumers: list[Any] = [getattr(backend, "result_consumer", None) for backend in backends]
        if None in consumers:
            time.sleep(min(seconds, _POLL_INTERVAL))
            for result in firsts:
                result.ready()  # a finished one fires _finished
            return
        for consumer in consumers:  # one, unless the jobs were made in several threads
            with contextlib.suppress(TimeoutError):  # socket.timeout: nothing arrived
                consumer.drain_events(timeout=seconds / len(consumers))

    def discard(self, job: Job[Any]) -> None:
        """Stop watching ``job`` (it keeps running; its handle still works) and release its subscription."""
        with self._lock:
            jobs = self._pending.get(job.id, [])
            if job in jobs:
                jobs.remove(job)
            if not jobs:
                self._pending.pop(job.id, None)
        job.async_result.backend.remove_pending_result(job.async_result)

    def close(self) -> None:
        """Stop watching every job not yet finished (see :meth:`discard`)."""
        with self._lock:
            left = [job for jobs in self._pending.values() for job in jobs]
        for job in left:
            self.discard(job)


def iter_completed(
    jobs: Iterable[Job[Any]], timeout: float, stop: threading.Event | None = None
) -> Iterator[Job[Any]]:
    """Yield ``jobs`` as they finish; :class:`ResultTimeout` if some are left after ``timeout`` seconds.
    Stops early once ``stop`` is set. Unfinished jobs are released when the iteration ends, however."""
    collector = ResultCollector()
    for job in jobs:
        collector.add(job)
    deadline = time.monotonic() + timeout
    try:
        while len(collector) and not (stop and stop.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResultTimeout(f"{collector.pending} job(s) gave no result within {timeout:g} s")
            done = collector.next_done(min(remaining, _WAIT_SLICE))
            if done is not None:
                yield done
    finally:
        collector.close()


async def aiter_completed(jobs: Iterable[Job[Any]], timeout: float) -> AsyncIterator[Job[Any]]:
    """:func:`iter_completed` for asyncio: it runs in one thread of the loop's default executor and hands
    each job over to the loop; leaving the ``async for`` stops that thread within a second."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Job[Any] | BaseException | None] = asyncio.Queue()
    stop = threading.Event()

    def hand_over(item: Job[Any] | BaseException | None) -> None:
        if not stop.is_set():
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for job in iter_completed(jobs, timeout, stop):
                hand_over(job)
            hand_over(None)
        except Exception as exc:  # ResultTimeout, or a backend error: raised in the loop
            hand_over(exc)

    pumping = loop.run_in_executor(None, pump)
    try:
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.shield(pumping)
