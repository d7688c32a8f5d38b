"""A poison job in a batch: it crashes its worker (SIGKILL) each time it reaches the model until the
redelivery cap ends it WorkerLost, and its batch mates still succeed, under both schedulers.

The other fault tests are in test_faults.py (the poison job alone under the cap among them: the two files
take about the same time, so that ``--dist loadfile`` runs them side by side). The test runs on a Redis of its
own: workers on one broker must share one visibility timeout."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from producer import WorkerLost
from tests.integration.conftest import IMAGES, Stack, wait_for
from tests.integration.fault_tools import FAST_FETCH, crash_until_verdict, queue_name
from worker.delivery import DeliveryLedger

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_poison_job_fails_alone_and_its_batch_mates_succeed(stack: Stack, scheduler: str) -> None:
    client, queue = stack.client, queue_name("mates")
    env = {
        "LLAVA_SCHEDULER": scheduler,
        **FAST_FETCH,
        "LLAVA_VISIBILITY_TIMEOUT": "8",
        "LLAVA_JOB_TIMEOUT": "5",
        "LLAVA_MAX_DELIVERIES": "2",
        "LLAVA_CONCURRENCY": "4",
        "LLAVA_MAX_BATCH_SIZE": "4",
        "LLAVA_MAX_BATCH_WAIT_MS": "1500",  # the four queued jobs form one batch
        "LLAVA_FAULT_CRASH_MARKER": "[crash]",
    }
    poison = client.caption(IMAGES / "stop_sign.jpg", "[crash] me", queue=queue, max_new_tokens=4)
    mates = [client.caption(IMAGES / "radar_chart.png", queue=queue, max_new_tokens=4) for _ in range(3)]
    ledger = redis.Redis.from_url(client.settings.result_backend)

    def crashed(process: Any, crashes: int) -> None:
        attempts = [ledger.hget(DeliveryLedger.key(job.id), "attempts") for job in [poison, *mates]]
        if crashes == 1 and scheduler == "static":  # the first crash took the whole batch down
            assert attempts == [b"1"] * 4
        if crashes == 1:  # the engine admits in arrival order: the poison joined first
            assert attempts[0] == b"1"

    crashes = crash_until_verdict(stack, queue, env, poison, crashed, cap=2)
    with pytest.raises(WorkerLost, match="max_deliveries 2"):
        poison.get()
    assert crashes == 2
    assert all(job.get(timeout=60).generated_tokens >= 1 for job in mates)
    # The images waited in the blob store through both crashes and left with their jobs, poison included.
    wait_for(lambda: not list(ledger.scan_iter("llava-blob-*")), 10, "the blobs to be released")
