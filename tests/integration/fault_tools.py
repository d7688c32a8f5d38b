"""Helpers shared by the fault tests (test_faults.py, test_poison.py): fast fetch failures, the slow-decode
fault, queue names, the jobs a worker has on its model."""

from __future__ import annotations

import uuid

from producer import LlavaClient
from tests.integration.conftest import health

FAST_FETCH = {"LLAVA_FETCH_RETRIES": "0", "LLAVA_FETCH_DEADLINE": "1", "LLAVA_FETCH_TIMEOUT": "1"}
SLOW = {"LLAVA_FAULT_SLOW_MARKER": "[slow]", "LLAVA_FAULT_SLOW_STEP_S": "0.2"}


def queue_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def in_flight(client: LlavaClient, hostname: str) -> int:
    return int(health(client, hostname).get("batching", {}).get("in_flight", 0))
