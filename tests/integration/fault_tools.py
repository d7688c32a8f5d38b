"""Helpers shared by the fault tests (test_faults.py, test_poison.py): fast fetch failures, the slow-decode
fault, queue names, and a worker's health asked of that worker alone."""

from __future__ import annotations

import uuid
from typing import Any

from producer import LlavaClient
from producer.contract import HEALTH_COMMAND

FAST_FETCH = {"LLAVA_FETCH_RETRIES": "0", "LLAVA_FETCH_DEADLINE": "1", "LLAVA_FETCH_TIMEOUT": "1"}
SLOW = {"LLAVA_FAULT_SLOW_MARKER": "[slow]", "LLAVA_FAULT_SLOW_STEP_S": "0.2"}


def queue_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def health(client: LlavaClient, hostname: str, timeout: float = 2.0) -> dict[str, Any]:
    """``hostname``'s health, ``{}`` if it does not answer within ``timeout``. Addressed to that worker, the
    broadcast returns with its reply (``worker_health`` waits out its whole timeout for any other worker)."""
    control = client.app.control
    replies = control.broadcast(HEALTH_COMMAND, reply=True, timeout=timeout, destination=[hostname])
    for reply in replies or []:
        if isinstance(reply.get(hostname), dict):
            return dict(reply[hostname])
    return {}


def in_flight(client: LlavaClient, hostname: str) -> int:
    return int(health(client, hostname).get("batching", {}).get("in_flight", 0))
