"""Dynamic batching: task threads hand prepared jobs to one model thread, which runs them in batches.

The rules are one pure function, :func:`plan`: jobs past their deadline leave first (``JobTimeout``); the
oldest job picks the batch (every waiting job with the same compatibility key, in arrival order, up to
``max_batch_size``); a full batch runs at once, a partial one once its oldest job has waited ``max_wait``; a
job keyed :class:`Alone` is a full batch by itself.
:class:`DynamicBatcher` applies the plan on a thread; it knows nothing of models or Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from producer.errors import InternalError, JobTimeout, LlavaError

if TYPE_CHECKING:
    from worker.runtime import Sampling

log = logging.getLogger(__name__)

Runner = Callable[[Hashable, list[Any]], Sequence[Any]]
_Self = TypeVar("_Self", bound="ModelThread")
_Key = TypeVar("_Key", bound=Hashable)


@dataclass(eq=False)
class Pending:
    """A job waiting for the model: its compatibility key, what to run, when it came, when it must end."""

    key: Hashable
    payload: Any
    enqueued: float
    deadline: float
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Done:
    """A job's output and how it ran: the size of its batch and how long it waited for the model."""

    output: Any
    batch_size: int
    waited: float


@dataclass(frozen=True)
class BatchKey:
    """Which jobs may share a model call: jobs scoring labels (no ``sampling``), or jobs generating with
    equal ``sampling``."""

    sampling: Sampling | None = None

    @property
    def scores(self) -> bool:
        return self.sampling is None


SCORE = BatchKey()  # the key of every classify job with labels


@dataclass(frozen=True)
class Alone:
    """The key of a job that must run with no batch-mates (a suspect redelivery): a full batch by itself."""

    job_id: str
    key: Hashable


@dataclass(frozen=True)
class Plan:
    expired: list[Pending]
    batch: list[Pending]
    wait: float | None  # seconds until the plan may change (None: nothing waiting)


def plan(pending: Sequence[Pending], now: float, max_batch_size: int, max_wait: float) -> Plan:
    """What to do now with ``pending`` (in arrival order). Pure: no clocks, no locks."""
    expired = [job for job in pending if job.deadline <= now]
    live = [job for job in pending if job.deadline > now]
    if not live:
        return Plan(expired, [], None)
    head = live[0]
    compatible = [job for job in live if job.key == head.key][:max_batch_size]
    full = isinstance(head.key, Alone) or len(compatible) >= max_batch_size
    if full or now - head.enqueued >= max_wait:
        return Plan(expired, compatible, None)
    next_change = min(head.enqueued + max_wait, min(job.deadline for job in live))
    return Plan(expired, [], max(0.0, next_change - now))


class ModelThread(Generic[_Key]):
    """What every scheduler of the one model thread shares: start, stop, enqueue, submit-and-wait with a
    deadline, and abandon at the end of a warm shutdown. Subclasses keep their queues and write
    :meth:`submit`, :meth:`_queue` (where :meth:`_enqueue` adds a job), :meth:`_loop` and :meth:`_all_jobs`
    (every waiting and running job)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llava-model", daemon=True)

    def start(self: _Self) -> _Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current batch or step; what still waits fails with ``InternalError``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, key: _Key, payload: Any, timeout: float) -> Future:
        raise NotImplementedError

    def run(self, key: _Key, payload: Any, timeout: float) -> Done:
        """Submit and wait: the output, the job's error, or ``JobTimeout`` once ``timeout`` has passed (the
        job is cancelled then: a scheduler that can drop it does)."""
        future = self.submit(key, payload, timeout)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            message = f"the job did not finish within its {timeout:g} s deadline (job_timeout)"
            raise JobTimeout(message) from None

    def abandon(self, error: BaseException) -> int:
        """Fail every waiting and running job with ``error`` now (their outputs are dropped). Used when a
        warm shutdown's grace period ends: their tasks requeue them. Returns how many."""
        with self._cond:
            jobs = self._all_jobs()
        abandoned = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
                abandoned += 1
        return abandoned

    def _enqueue(self, job: Any) -> None:
        with self._cond:
            if self._stopping:
                raise InternalError("the worker is shutting down")
            self._queue().append(job)  # looked up under the lock: the model thread replaces the list
            self._cond.notify_all()

    def _queue(self) -> list[Any]:
        """The list a new job joins (the model thread may replace it, under the lock, as it takes jobs)."""
        raise NotImplementedError

    def _all_jobs(self) -> list[Any]:
        """Every waiting and running job; the waiting ones leave their queue (called under the lock)."""
        raise NotImplementedError

    def _loop(self) -> None:
        raise NotImplementedError


class DynamicBatcher(ModelThread[Hashable]):
    """Runs ``runner(key, payloads)`` on one thread, in batches planned by :func:`plan`.

    ``runner`` returns one output per payload (checked), where an exception instance fails just that job,
    or raises, which fails the whole batch (the runner splits or retries first if it can).
    """

    def __init__(self, runner: Runner, max_batch_size: int, max_wait: float, clock=time.monotonic) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        super().__init__(clock)
        self._runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self._pending: list[Pending] = []
        self._running: list[Pending] = []
        self.batches_run = 0
        self.jobs_run = 0

    def submit(self, key: Hashable, payload: Any, timeout: float) -> Future:
        """Queue ``payload`` for the model; the future holds its output or its error."""
        now = self._clock()
        job = Pending(key, payload, enqueued=now, deadline=now + timeout)
        self._enqueue(job)
        return job.future

    def _queue(self) -> list[Any]:
        return self._pending

    def _all_jobs(self) -> list[Any]:
        jobs = self._pending + self._running
        self._pending = []
        return jobs

    @property
    def in_flight(self) -> int:
        """Jobs waiting for the model or in its running batch."""
        with self._cond:
            return len(self._pending) + len(self._running)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    self._fail_waiting(InternalError("the worker is shutting down"))
                    return
                step = plan(self._pending, self._clock(), self.max_batch_size, self.max_wait)
                taken = {id(job) for job in step.expired + step.batch}
                self._pending = [job for job in self._pending if id(job) not in taken]
                if not step.batch and not step.expired:
                    self._cond.wait(step.wait)
                    continue
                self._running = step.batch
            for job in step.expired:
                _settle(job, error=JobTimeout("the job waited past its deadline for the model (job_timeout)"))
            if step.batch:
                self._run_batch(step.batch)
            with self._cond:
                self._running = []

    def _run_batch(self, batch: list[Pending]) -> None:
        started = self._clock()
        try:
            outputs = self._runner(batch[0].key, [job.payload for job in batch])
            if len(outputs) != len(batch):
                raise InternalError(f"the runner returned {len(outputs)} outputs for {len(batch)} jobs")
        except LlavaError as exc:
            for job in batch:
                _settle(job, error=exc)
            return
        except Exception as exc:  # the model failed unexpectedly: every job of the batch learns why
            log.exception("batch of %d failed", len(batch))
            for job in batch:
                _settle(job, error=InternalError(f"{type(exc).__name__}: {exc}"))
            return
        self.batches_run += 1
        self.jobs_run += len(batch)
        for job, output in zip(batch, outputs, strict=True):
            if isinstance(output, BaseException):  # one job of the batch failed on its own
                _settle(job, error=output)
            else:
                _settle(job, result=Done(output, len(batch), started - job.enqueued))

    def _fail_waiting(self, error: LlavaError) -> None:
        for job in self._pending:
            _settle(job, error=error)
        self._pending.clear()


class _Settled(Protocol):
    """Any job with a future to complete (a :class:`Pending` here, the engine's jobs too)."""

    @property
    def future(self) -> Future: ...


def _settle(job: _Settled, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a job's future unless it was already (e.g. abandoned at shutdown)."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except InvalidStateError:
        pass
