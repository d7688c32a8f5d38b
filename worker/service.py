"""What a job does, between the Celery task and the runtime: decode its request (its kind's entry in
:mod:`worker.jobs`), load the image, prepare the prompt, run it on the model thread, encode the result.

``Service.run`` is the single place where exceptions become coded :mod:`producer.errors` (the worker's
"interceptor"): tasks stay thin and never convert errors themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL.Image import Image

from producer.contract import Request, Timings
from producer.errors import InternalError, JobTimeout, LlavaError
from worker import metrics
from worker.batching import Done
from worker.executor import Item, ModelHooks
from worker.faults import Faults
from worker.fetch import FetchAborted
from worker.health import JobStats
from worker.host import ModelHost
from worker.images import ImageLoader, keep_side_for
from worker.jobs import JOB_KINDS, JobKind, Work
from worker.runtime import Prepared, Prompt, Runtime
from worker.runtime.preprocessing import PoolStopped
from worker.runtime.scoring import refuse_special_tokens
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What the queue tells us about a job: its id, the node running it, when the producer sent it."""

    job_id: str
    worker: str
    sent_at: float | None = None
    isolated: bool = False  # redelivered after its worker died on the model: no batch-mates
    redelivered: bool = False  # Redis delivered this message again (not a new send under the same id)

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


class Requeue(Exception):
    """The worker is shutting down and its grace period is over: give the job back to the queue."""


class Service:
    """Serves the job kinds of :data:`worker.jobs.JOB_KINDS`, each job on its own thread: parse its request,
    load its image, prepare the prompt, run it on the model thread, encode the result. The model side (the
    model, the preprocessing pool, the model thread) is :class:`worker.host.ModelHost`."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.faults = Faults.from_settings(settings)
        self.images = ImageLoader(settings)
        self.stats = JobStats()
        # Told the job ids of each model call as it starts and ends (the delivery ledger counts the deaths of
        # workers mid-call: see worker.delivery); read at each call, so they may be set after start().
        self.on_model_start: Callable[[list[str]], None] = lambda job_ids: None
        self.on_model_end: Callable[[list[str]], None] = lambda job_ids: None
        hooks = ModelHooks(
            lambda job_ids: self.on_model_start(job_ids), lambda job_ids: self.on_model_end(job_ids)
        )
        self.host = ModelHost(settings, self.faults, hooks)

    def start(self) -> Runtime:
        """Load the model (once per process) and start the model thread and the preprocessing pool."""
        runtime = self.host.start()
        self.images.keep_side = keep_side_for(runtime.processor.image_processor)
        return runtime

    def stop(self) -> None:
        self.host.stop()

    def begin_shutdown(self, grace: float) -> None:
        """Warm shutdown: running jobs get ``grace`` seconds to finish; then the rest are requeued."""
        log.warning("warm shutdown: running jobs have %g s to finish, then they go back to the queue", grace)

        def requeue_rest() -> None:
            if fetching := self.images.abort_fetches():
                log.warning(
                    "grace period over: %d image fetch(es) aborted (or decode waits), jobs go back", fetching
                )
            count = self.host.abandon(Requeue("the worker shut down before the job finished"))
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
        return self.host.health(self.stats)

    def _serve(self, task_name: str, request: Any, context: JobContext) -> dict[str, Any]:
        clock = _Clock()
        kind = JOB_KINDS[task_name]
        parsed, work = self._parse(kind, request)
        timeout = min(parsed.timeout_s or self.settings.job_timeout, self.settings.job_timeout)
        deadline = time.monotonic() + timeout
        image = self._image(parsed.image, deadline)
        clock.lap("image")
        prepared = self._prepare(Prompt(image, work.text), work.reserve, deadline)
        clock.lap("preprocess")
        done = self._model(work, prepared, context, deadline, timeout)
        clock.lap("model")
        timings = clock.timings(done, context.sent_at)
        return kind.encode(work, done.output, timings, self.settings.served_model_name, context.worker)

    def _parse(self, kind: JobKind, request: Any) -> tuple[Request, Work]:
        """The request, checked (labels with special tokens refused before the processor reads them in the
        prompt), and the model's work."""
        parsed, work = kind.decode(request, self.settings)
        if work.labels:
            refuse_special_tokens(self.host.loaded().processor.tokenizer, work.labels)
        return parsed, work

    def _image(self, reference: str, deadline: float) -> Image:
        try:
            return self.images.load(reference, deadline)
        except FetchAborted:
            raise Requeue("the worker shut down while the job's image was being fetched") from None

    def _prepare(self, prompt: Prompt, reserve: int, deadline: float) -> Prepared:
        try:
            return self.host.prepare(prompt, reserve, deadline)
        except PoolStopped as exc:
            raise Requeue(str(exc)) from None

    def _model(
        self, work: Work, prepared: Prepared, context: JobContext, deadline: float, timeout: float
    ) -> Done:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeout(f"the job used up its {timeout:g} s deadline before reaching the model")
        marks = self.faults.marks(" ".join([work.text, *(work.labels or [])]))
        item = Item(prepared, work.labels, context.isolated, marks, work.query, deadline, context.job_id)
        return self.host.run(work.key, item, timeout=remaining)

    def record_failure(self, error: LlavaError, context: JobContext, task_name: str) -> None:
        """Log a failed job once (job id + code) and count it."""
        log.warning("job %s (%s) failed: %s", context.job_id, task_name, error)
        metrics.job_failed(task_name, error)
        self.stats.failed(context.job_id, error)


MAX_ERROR_CHARS = 2000  # an error message is stored in the result backend: never a copy of the input


def _bounded(error: LlavaError) -> LlavaError:
    """``error``, its message cut to :data:`MAX_ERROR_CHARS`."""
    if len(error.message) <= MAX_ERROR_CHARS:
        return error
    return type(error)(error.message[: MAX_ERROR_CHARS - 1] + "…", retryable=error.retryable)
