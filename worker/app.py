"""Celery wiring for the worker: thin tasks that hand each job to :class:`worker.service.Service`."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_shutdown, worker_shutting_down
from kombu import Queue

from producer.app import create_celery_app
from producer.contract import SENT_AT_HEADER, TASK_NOOP, TASKS
from producer.errors import InvalidRequest, LlavaError
from worker import control  # noqa: F401  # registers the llava_health inspect command
from worker.delivery import DeliveryLedger, LedgerUnavailable
from worker.results import BACKENDS as RESULT_BACKENDS
from worker.results import TaskRequest, redelivered
from worker.service import JobContext, Requeue, Service
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


def create_app(settings: WorkerSettings, service: Service, app: Celery | None = None) -> Celery:
    """The worker's Celery app (``app``, or a new one): the shared configuration, the queues it consumes,
    one task per job kind."""
    app = app or create_celery_app(settings, main="llava-worker")
    app.loader.override_backends = RESULT_BACKENDS  # one round trip per stored result (worker.results)
    app.conf.task_queues = [Queue(name) for name in settings.consumed_queues]
    app.conf.worker_consumer = "worker.delivery:LlavaConsumer"
    app.llava_service = service  # read by the llava_health inspect command
    ledger = DeliveryLedger(app, settings)
    service.on_model_start, service.on_model_end = ledger.model_started, ledger.model_finished
    service.images.blobs = ledger.blobs
    for name in TASKS:
        app.task(
            name=name,
            bind=True,
            throws=(LlavaError,),
            after_return=_release_blob(ledger),
            Request=TaskRequest,  # its failure events carry no traceback
        )(_task_function(name, service, ledger))

    def on_shutting_down(**_: Any) -> None:
        ledger.stopping.set()
        service.begin_shutdown(settings.shutdown_grace)

    worker_shutting_down.connect(on_shutting_down, weak=False)
    # after the task threads ended (their requeues' writes queued): the ledger's pending writes go out
    worker_shutdown.connect(lambda **_: ledger.close(), weak=False)
    app.task(name=TASK_NOOP, bind=True)(_noop)
    return app


def _noop(task: Task) -> dict[str, str]:
    """A job that does nothing: measures the queue's own round trip (bench) and proves a worker answers."""
    return {"worker": str(task.request.hostname)}


def _task_function(task_name: str, service: Service, ledger: DeliveryLedger) -> Any:
    def run(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        context = JobContext(
            job_id=str(task.request.id),
            worker=str(task.request.hostname),
            sent_at=_float_or_none(getattr(task.request, SENT_AT_HEADER, None)),
            redelivered=redelivered(task.request),
        )
        try:
            return _deliver(task_name, service, ledger, context, args, kwargs)
        except Requeue as exc:
            ledger.undeliver(context.job_id)
            raise Reject(str(exc), requeue=True) from None
        except LedgerUnavailable as exc:  # nothing ran and nothing was counted: the job goes back as it came
            log.warning("job %s goes back to the queue: %s", context.job_id, exc)
            raise Reject(str(exc), requeue=True) from None

    run.__name__ = task_name.replace(".", "_")
    return run


def _release_blob(ledger: DeliveryLedger) -> Any:
    """A task's ``after_return``: Celery calls it once the outcome (success or failure, not a requeue) is
    stored, before the message is acknowledged, so a worker dying in between finds the stored result on
    redelivery instead of a released image."""

    def after_return(task: Task, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, *_: Any):
        ledger.release_blob((kwargs or {}).get("request"), task_id)

    return after_return


def _deliver(
    task_name: str,
    service: Service,
    ledger: DeliveryLedger,
    context: JobContext,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    delivery = ledger.arrived(context.job_id, patience=service.settings.job_timeout)
    if delivery.succeeded is not None:
        log.info("job %s already succeeded: returning its stored result", context.job_id)
        return dict(delivery.succeeded)
    if delivery.failed is not None and context.redelivered:  # the same send: the same outcome again
        log.info("job %s already failed: raising its stored error", context.job_id)
        raise delivery.failed
    if args or set(kwargs) != {"request"}:
        error = InvalidRequest(_envelope_problem(args, kwargs))
        service.record_failure(error, context, task_name)
        raise error
    verdict = ledger.verdict(delivery)
    if verdict is not None:
        service.record_failure(verdict, context, task_name)
        raise verdict
    return service.run(task_name, kwargs["request"], context.isolated_if(delivery.suspect))


def _envelope_problem(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What is wrong with a task call's arguments (the contract: one keyword argument, ``request``)."""
    problems = []
    if args:
        problems.append(f"{len(args)} positional argument(s)")
    extra = sorted(set(kwargs) - {"request"})
    if extra:
        problems.append(f"unknown keyword argument(s) {', '.join(map(repr, extra[:5]))}")
    if "request" not in kwargs:
        problems.append("no 'request' keyword argument")
    return "the task takes exactly one keyword argument, 'request' (a JSON object): got " + "; ".join(
        problems
    )


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
