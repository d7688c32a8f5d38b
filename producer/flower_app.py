"""The Celery app ``llava-queue flower`` runs Flower with (``celery -A producer.flower_app flower``): the
queue's own configuration, read from ``LLAVA_*`` settings like every other part, so Flower reaches the
broker as the workers do (Redis Sentinel's master name and timeouts included, which a bare
``CELERY_BROKER_URL`` cannot carry)."""

from __future__ import annotations

from producer.app import create_celery_app, load_settings
from producer.settings import ClientSettings

app = create_celery_app(load_settings(ClientSettings), main="llava-flower")
