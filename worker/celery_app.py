"""The llava worker's Celery app at module level, for Celery's own command line::

    celery -A worker.celery_app worker --hostname gpu0@%h     # the same worker as llava-worker
    celery -A worker.celery_app inspect llava_health          # each worker's health
    celery -A worker.celery_app status

Importing it is cheap: it reads the worker settings (``LLAVA_*`` environment, ``LLAVA_CONFIG``) and builds
the app; no torch, no model. ``celery ... worker`` loads the model when the worker initialises, before it
consumes its first job, and exits 1 with the reason printed once when it cannot. Celery's own
``CELERY_BROKER_URL`` and ``CELERY_RESULT_BACKEND`` variables (and ``--broker``) win over the settings.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init, worker_shutdown
from kombu import Queue

from producer.app import create_celery_app
from worker import control  # noqa: F401  # registers llava_health, so `celery inspect llava_health` knows it
from worker.settings import get_settings

settings = get_settings()
app = create_celery_app(settings, main="llava-worker")
app.conf.update(
    task_queues=[Queue(name) for name in settings.consumed_queues],
    worker_pool="threads",  # heartbeats keep flowing while the model computes
    worker_concurrency=settings.threads,
)


@worker_init.connect(weak=False)
def _load_model_and_tasks(sender: Any = None, **_: Any) -> None:
    """Before the worker consumes: load the model, register the tasks on ``app``."""
    sender_app: Any = getattr(sender, "app", None)
    if sender_app is not app:
        return
    from worker.app import create_app
    from worker.cli import configure_logging, start_service
    from worker.service import Service

    configure_logging(settings)
    service = Service(settings)
    create_app(settings, service, app)
    sender.consumer_cls = app.conf.worker_consumer  # read before this signal; the consumer starts after it
    if not start_service(settings, service, app):
        raise SystemExit(1)
    worker_shutdown.connect(lambda **_: service.stop(), weak=False)
