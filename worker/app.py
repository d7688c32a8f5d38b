"""Celery wiring for the worker: thin tasks that hand each job to :class:`worker.service.Service`."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.worker.control import inspect_command
from kombu import Queue

from producer.app import create_celery_app
from producer.client import SENT_AT_HEADER
from producer.contract import TASK_NOOP, TASKS
from producer.errors import LlavaError
from worker.service import JobContext, Service
from worker.settings import WorkerSettings


def create_app(settings: WorkerSettings, service: Service) -> Celery:
    """The worker's Celery app: the shared configuration, the queues it consumes, one task per job kind."""
    app = create_celery_app(settings, main="llava-worker")
    app.conf.task_queues = [Queue(name) for name in settings.consumed_queues]
    app.llava_service = service  # type: ignore[attr-defined]  # read by the llava_health inspect command
    for name in TASKS:
        app.task(name=name, bind=True, throws=(LlavaError,))(_task_function(name, service))
    app.task(name=TASK_NOOP, bind=True)(_noop)
    return app


def _noop(task: Task) -> dict[str, str]:
    """A job that does nothing: measures the queue's own round trip (bench) and proves a worker answers."""
    return {"worker": str(task.request.hostname)}


def _task_function(task_name: str, service: Service) -> Any:
    def run(task: Task, request: Any = None) -> dict[str, Any]:
        context = JobContext(
            job_id=str(task.request.id),
            worker=str(task.request.hostname),
            sent_at=_float_or_none(getattr(task.request, SENT_AT_HEADER, None)),
        )
        return service.run(task_name, request, context)

    run.__name__ = task_name.replace(".", "_")
    return run


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@inspect_command()
def llava_health(state: Any) -> dict[str, Any]:
    """llava-queue worker health: model, device, loads, jobs done/failed, last error, queues."""
    service = getattr(state.consumer.app, "llava_service", None)
    return service.health() if service is not None else {"model_loaded": False}
