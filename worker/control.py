"""Remote-control commands of the llava worker; torch-free, so `celery inspect` clients know them too."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from producer.contract import HEALTH_COMMAND


@inspect_command(name=HEALTH_COMMAND)
def llava_health(state: Any) -> dict[str, Any]:
    """llava-queue worker health: model, device, loads, jobs done/failed, last error, queues."""
    service = getattr(state.consumer.app, "llava_service", None)
    return service.health() if service is not None else {"model_loaded": False}
