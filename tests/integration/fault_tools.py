"""Helpers shared by the fault tests (test_faults.py, test_poison.py): fast fetch failures, the slow-decode
fault, queue names, the jobs a worker has on its model, workers started until a poison job's verdict."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from producer import LlavaClient
from tests.integration.conftest import Stack, health, wait_for

FAST_FETCH = {"LLAVA_FETCH_RETRIES": "0", "LLAVA_FETCH_DEADLINE": "1", "LLAVA_FETCH_TIMEOUT": "1"}
SLOW = {"LLAVA_FAULT_SLOW_MARKER": "[slow]", "LLAVA_FAULT_SLOW_STEP_S": "0.2"}


def queue_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def in_flight(client: LlavaClient, hostname: str) -> int:
    return int(health(client, hostname).get("batching", {}).get("in_flight", 0))


def crash_until_verdict(
    stack: Stack, queue: str, env: dict[str, str], poison: Any, on_crash: Callable[[Any, int], None], cap: int
) -> int:
    """Start a worker on ``queue`` after each one the ``poison`` job crashed, until that job has its verdict;
    ``on_crash(process, crashes so far)`` after each crash. Returns the crashes (never more than ``cap``)."""
    crashes = 0
    while not poison.ready():
        worker, _ = stack.start(queue, wait=False, **env)
        process = worker.process
        wait_for(lambda p=process: poison.ready() or p.poll() is not None, 60, "a crash or the verdict")
        if process.poll() is not None:
            crashes += 1
            on_crash(process, crashes)
        assert crashes <= cap, "the redelivery cap did not stop the loop"
    return crashes
