"""Celery wiring for the worker: thin tasks that hand each job to :class:`worker.service.Service`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, states
from celery.exceptions import Reject
from celery.signals import worker_shutting_down
from kombu import Queue

from producer.app import create_celery_app
from producer.client import SENT_AT_HEADER
from producer.contract import TASK_NOOP, TASKS
from producer.errors import LlavaError, WorkerLost
from worker import control  # noqa: F401  # registers the llava_health inspect command
from worker.service import JobContext, Requeue, Service
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def create_app(settings: WorkerSettings, service: Service, app: Celery | None = None) -> Celery:
    """The worker's Celery app (``app``, or a new one): the shared configuration, the queues it consumes,
    one task per job kind."""
    app = app or create_celery_app(settings, main="llava-worker")
    app.conf.task_queues = [Queue(name) for name in settings.consumed_queues]
    app.llava_service = service  # type: ignore[attr-defined]  # read by the llava_health inspect command
    ledger = DeliveryLedger(app, settings)
    for name in TASKS:
        app.task(name=name, bind=True, throws=(LlavaError,))(_task_function(name, service, ledger))

    def on_shutting_down(**_: Any) -> None:
        service.begin_shutdown(settings.shutdown_grace)

    worker_shutting_down.connect(on_shutting_down, weak=False)
    app.task(name=TASK_NOOP, bind=True)(_noop)
    return app


def _noop(task: Task) -> dict[str, str]:
    """A job that does nothing: measures the queue's own round trip (bench) and proves a worker answers."""
    return {"worker": str(task.request.hostname)}


class DeliveryLedger:
    """Per-job facts kept in the result backend (Redis): how often a job was delivered, whether it succeeded.

    With ``acks_late``, a job whose worker dies is delivered again; one that kills every worker would loop
    forever. Counting deliveries caps that loop (``max_deliveries``, then ``WorkerLost``). A job delivered
    again after it succeeded (its worker died between storing the result and acknowledging it, or the producer
    re-sent its id) returns the stored result instead of running twice.
    """

    def __init__(self, app: Celery, settings: WorkerSettings) -> None:
        self.backend = app.backend
        self.max_deliveries = settings.max_deliveries
        self.expires = settings.result_expires
        self.client = getattr(self.backend, "client", None)  # redis.Redis for the Redis backend
        if self.client is None:
            log.warning(
                "result backend %s has no Redis client: the redelivery cap is off", type(self.backend)
            )

    def _key(self, job_id: str) -> str:
        return f"llava-deliveries-{job_id}"

    def delivered(self, job_id: str) -> int:
        """Count one more delivery of ``job_id``; returns the count (0 when counting is off)."""
        if self.client is None:
            return 0
        pipe = self.client.pipeline()
        pipe.incr(self._key(job_id))
        pipe.expire(self._key(job_id), self.expires)
        count, _ = pipe.execute()
        return int(count)

    def undeliver(self, job_id: str) -> None:
        """A requeue at shutdown is not the job's fault: take its delivery back."""
        if self.client is not None:
            self.client.decr(self._key(job_id))

    def stored_result(self, job_id: str) -> Any | None:
        meta = self.backend.get_task_meta(job_id)
        return meta.get("result") if meta.get("status") == states.SUCCESS else None


def _task_function(task_name: str, service: Service, ledger: DeliveryLedger) -> Any:
    def run(task: Task, request: Any = None) -> dict[str, Any]:
        context = JobContext(
            job_id=str(task.request.id),
            worker=str(task.request.hostname),
            sent_at=_float_or_none(getattr(task.request, SENT_AT_HEADER, None)),
        )
        stored = ledger.stored_result(context.job_id)
        if stored is not None:
            log.info("job %s already succeeded: returning its stored result", context.job_id)
            return stored
        deliveries = ledger.delivered(context.job_id)
        if deliveries > ledger.max_deliveries:
            error = WorkerLost(
                f"the job was delivered {deliveries} times and its worker died each time (max_deliveries "
                f"{ledger.max_deliveries}); it is not retried again"
            )
            service.record_failure(error, context, task_name)
            raise error
        try:
            return service.run(task_name, request, context)
        except Requeue as exc:
            ledger.undeliver(context.job_id)
            raise Reject(str(exc), requeue=True) from None

    run.__name__ = task_name.replace(".", "_")
    return run


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
