"""What a job does, between the Celery task and the runtime: decode its request (its kind's entry in
:mod:`worker.jobs`), load the image, prepare the prompt, run it on the model thread, encode the result.

``Service.run`` is the single place where exceptions become coded :mod:`producer.errors` (the worker's
"interceptor"): tasks stay thin and never convert errors themselves.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

from producer.contract import Timings
from producer.errors import InternalError, JobTimeout, LlavaError, ResourceExhausted
from worker import metrics
from worker.batching import SCORE, Alone, BatchKey, Done, DynamicBatcher
from worker.engine import ContinuousEngine
from worker.faults import Faults
from worker.fetch import FetchAborted
from worker.health import JobStats, health
from worker.images import ImageLoader, keep_side_for
from worker.jobs import JOB_KINDS
from worker.runtime import Prepared, Prompt, Runtime
from worker.runtime.preprocessing import PoolStopped, PreprocessPool, default_workers
from worker.runtime.scoring import LabelQuery, refuse_special_tokens
from worker.settings import WorkerSettings
from worker.steps import RuntimeSteps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What the queue tells us about a job: its id, the node running it, when the producer sent it."""

    job_id: str
    worker: str
    sent_at: float | None = None
    isolated: bool = False  # redelivered after its worker died on the model: no batch-mates

    def isolated_if(self, suspect: bool) -> JobContext:
        return replace(self, isolated=True) if suspect else self


@dataclass
class _Clock:
    """Milliseconds per phase of one job."""

    started: float = field(default_factory=time.perf_counter)
    last: float = 0.0
    laps: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - (self.last or self.started)) * 1000, 3)
        self.last = now

    def total_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)

    def timings(self, done: Done, sent_at: float | None) -> Timings:
        """The job's timings once the model answered (``sent_at``: when the producer sent it, if known)."""
        total_ms = self.total_ms()
        since_sent_ms = None if sent_at is None else (time.time() - sent_at) * 1000
        wait_ms = round(done.waited * 1000, 3)
        return Timings(
            queued_ms=None if since_sent_ms is None else round(max(0.0, since_sent_ms - total_ms), 3),
            image_ms=self.laps["image"],
            preprocess_ms=self.laps["preprocess"],
            batch_wait_ms=wait_ms,
            inference_ms=round(max(0.0, self.laps["model"] - wait_ms), 3),
            total_ms=total_ms,
            batch_size=done.batch_size,
        )


@dataclass(frozen=True, eq=False)
class _Item:
    """What the model thread gets for one job."""

    prepared: Prepared
    deadline: float  # time.monotonic()
    labels: list[str] | None = None
    marks: frozenset[str] = frozenset()
    job_id: str = ""
    isolated: bool = False
    query: LabelQuery | None = None  # how to score the labels (with labels)


class Requeue(Exception):
    """The worker is shutting down and its grace period is over: give the job back to the queue."""


class Service:
    """Serves the job kinds of :data:`worker.jobs.JOB_KINDS`: each job's thread loads its image and runs the
    processor, then hands the prepared prompt to the one model thread (:class:`ContinuousEngine`, or the
    static :class:`DynamicBatcher`)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self.batcher: DynamicBatcher | ContinuousEngine | None = None
        self.preprocess: PreprocessPool | None = None  # the processor's processes (preprocess_workers)
        self.faults = Faults.from_settings(settings)
        self.images = ImageLoader(settings)
        self.stats = JobStats()
        # Told the job ids of each batch as the model starts and ends it (the delivery ledger counts the
        # deaths of workers mid-call: see worker.delivery).
        self.on_model_start: Callable[[list[str]], None] = lambda job_ids: None
        self.on_model_end: Callable[[list[str]], None] = lambda job_ids: None

    def start(self) -> Runtime:
        """Load the model (once per process) and start the model thread (``scheduler``: the continuous
        engine, or the static batcher)."""
        if self.runtime is None:
            self.runtime = runtime = Runtime(self.settings)
            self.images.keep_side = keep_side_for(runtime.processor.image_processor)
            workers = self.settings.preprocess_workers
            workers = default_workers() if workers is None else workers
            if workers:
                self.preprocess = PreprocessPool(runtime.processor, workers).start(PREPROCESS_START_S)
            if self.settings.scheduler == "static":
                wait = self.settings.max_batch_wait_ms / 1000
                self.batcher = DynamicBatcher(self._start_batch, self.settings.max_batch_size, wait).start()
            else:
                steps = RuntimeSteps(runtime, self.faults, self._classify, self._on_rows)
                budget, rows = runtime.kv_budget_tokens(), self.settings.max_running_rows
                prefill = self.settings.max_prefill_tokens
                self.batcher = ContinuousEngine(steps, budget, rows, prefill).start()
        return self.runtime

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        if self.preprocess is not None:
            self.preprocess.stop()

    def begin_shutdown(self, grace: float) -> None:
        """Warm shutdown: running jobs get ``grace`` seconds to finish; then the rest are requeued."""
        log.warning("warm shutdown: running jobs have %g s to finish, then they go back to the queue", grace)

        def requeue_rest() -> None:
            if fetching := self.images.abort_fetches():
                log.warning(
                    "grace period over: %d image fetch(es) aborted (or decode waits), jobs go back", fetching
                )
            if self.preprocess is not None:
                self.preprocess.abort()
            if self.batcher is not None:
                count = self.batcher.abandon(Requeue("the worker shut down before the job finished"))
                log.warning("grace period over: %d job(s) go back to the queue", count)

        timer = threading.Timer(grace, requeue_rest)
        timer.daemon = True
        timer.start()

    def run(self, task_name: str, request: Any, context: JobContext) -> dict[str, Any]:
        """Serve one job; every failure leaves as a coded :class:`LlavaError`, logged once."""
        try:
            result = self._serve(task_name, request, context)
        except LlavaError as exc:
            error = _bounded(exc)
            self.record_failure(error, context, task_name)
            raise error from None
        except Requeue:
            raise
        except Exception as exc:
            log.exception("job %s (%s) failed unexpectedly", context.job_id, task_name)
            error = InternalError(f"{type(exc).__name__}: {exc}")
            self.record_failure(error, context, task_name)
            raise error from None
        self.stats.succeeded()
        metrics.job_succeeded(task_name, result)
        return result

    def health(self) -> dict[str, Any]:
        """Per-worker health (see :func:`worker.health.health`)."""
        return health(self.settings, self.runtime, self.batcher, self.preprocess, self.stats)

    def _serve(self, task_name: str, request: Any, context: JobContext) -> dict[str, Any]:
        clock = _Clock()
        kind = JOB_KINDS[task_name]
        parsed, work = kind.decode(request, self.settings)
        timeout = min(parsed.timeout_s or self.settings.job_timeout, self.settings.job_timeout)
        deadline = time.monotonic() + timeout
        runtime, batcher = self._started()
        if work.labels:  # before the processor reads the labels in the prompt (exclusive mode)
            refuse_special_tokens(runtime.processor.tokenizer, work.labels)
        try:
            image = self.images.load(parsed.image, deadline)
        except FetchAborted:
            raise Requeue("the worker shut down while the job's image was being fetched") from None
        clock.lap("image")
        prepared = self._prepare(runtime, Prompt(image, work.text), work.reserve, deadline)
        clock.lap("preprocess")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout(f"the job used up its {timeout:g} s deadline before reaching the model")
        marks = self.faults.marks(" ".join([work.text, *(work.labels or [])]))
        item = _Item(
            prepared, deadline, work.labels, marks, context.job_id, context.isolated, query=work.query
        )
        if context.isolated and isinstance(batcher, DynamicBatcher):  # the engine reads item.isolated
            done = batcher.run(Alone(context.job_id, work.key), item, timeout=remaining)  # a batch of its own
        else:
            done = batcher.run(work.key, item, timeout=remaining)
        clock.lap("model")
        timings = clock.timings(done, context.sent_at)
        return kind.encode(work, done.output, timings, self.settings.served_model_name, context.worker)

    def _prepare(self, runtime: Runtime, prompt: Prompt, reserve: int, deadline: float) -> Prepared:
        """The processor's work, in this thread or in the preprocessing pool (waiting until ``deadline``)."""
        if self.preprocess is None:
            return runtime.prepare(prompt, reserve=reserve)
        try:
            return runtime.prepare(prompt, reserve, functools.partial(self.preprocess, deadline=deadline))
        except PoolStopped as exc:
            raise Requeue(str(exc)) from None

    def _start_batch(self, key: Hashable, items: list[_Item]) -> list[Any]:
        job_ids = [item.job_id for item in items]
        self.on_model_start(job_ids)
        try:
            return self._run_batch(key, items)
        finally:
            self.on_model_end(job_ids)

    def _run_batch(self, key: Hashable, items: list[_Item]) -> list[Any]:
        """The static batcher's work for one batch. Out of memory: free the failed attempt's tensors (after
        leaving the ``except`` block, so nothing of it is still referenced), split the batch in halves and
        retry each; a single job that still does not fit fails alone with ``ResourceExhausted``."""
        runtime = self._started()[0]
        try:
            return self._call_model(runtime, key, items)
        except Exception as exc:
            if not runtime.is_out_of_memory(exc):
                raise
            failure = type(exc).__name__
        runtime.free_memory()
        if len(items) == 1:
            return [ResourceExhausted(f"out of memory even alone ({failure})")]
        log.warning("out of memory with a batch of %d: splitting it in halves", len(items))
        half = len(items) // 2
        return self._run_batch(key, items[:half]) + self._run_batch(key, items[half:])

    def _classify(self, items: list[_Item]) -> list[Any]:
        """The continuous engine's classify: the jobs of one step through the runtime's public scoring call
        (scored together)."""
        job_ids = [item.job_id for item in items]
        self.on_model_start(job_ids)
        try:
            return self._call_model(self._started()[0], SCORE, items)
        finally:
            self.on_model_end(job_ids)

    def _on_rows(self, items: list[_Item], joined: bool) -> None:
        """The engine's rows joining and leaving the decode batch: the delivery ledger's attempts (one Redis
        round trip for all the rows of a step)."""
        if items:
            (self.on_model_start if joined else self.on_model_end)([item.job_id for item in items])

    def _call_model(self, runtime: Runtime, key: Hashable, items: list[_Item]) -> list[Any]:
        marks = [item.marks for item in items]
        self.faults.before_model_call(marks)
        if isinstance(key, Alone):
            key = key.key
        assert isinstance(key, BatchKey)
        if key.sampling is None:  # scoring labels
            queries = [i.query for i in items if i.query is not None]
            if len(queries) != len(items):
                raise InternalError("a classify job reached the model without its label query")
            labels = [i.labels or [] for i in items]
            return runtime.score_labels(
                [i.prepared for i in items], labels, [i.deadline for i in items], queries=queries
            )
        hook = self.faults.step_hook(marks)
        return runtime.generate([i.prepared for i in items], key.sampling, [i.deadline for i in items], hook)

    def record_failure(self, error: LlavaError, context: JobContext, task_name: str) -> None:
        """Log a failed job once (job id + code) and count it."""
        log.warning("job %s (%s) failed: %s", context.job_id, task_name, error)
        metrics.job_failed(task_name, error)
        self.stats.failed(context.job_id, error)

    def _started(self) -> tuple[Runtime, DynamicBatcher | ContinuousEngine]:
        if self.runtime is None or self.batcher is None:
            raise InternalError("the model is not loaded (Service.start() was not called)")
        return self.runtime, self.batcher


PREPROCESS_START_S = 120.0  # seconds for the preprocessing pool's processes to start and load the processor
MAX_ERROR_CHARS = 2000  # an error message is stored in the result backend: never a copy of the input


def _bounded(error: LlavaError) -> LlavaError:
    """``error``, its message cut to :data:`MAX_ERROR_CHARS`."""
    if len(error.message) <= MAX_ERROR_CHARS:
        return error
    return type(error)(error.message[: MAX_ERROR_CHARS - 1] + "…", retryable=error.retryable)
