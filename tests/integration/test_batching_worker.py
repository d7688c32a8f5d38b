"""Batching in the real worker: results batched or not, deadlines, and out-of-memory splitting."""

from __future__ import annotations

import time
import uuid

import pytest

from producer import JobTimeout, LlavaClient, ResourceExhausted
from tests.integration.conftest import IMAGES

WORKER_ENV = {
    "LLAVA_SCHEDULER": "static",  # the static batcher (the engine: tests/integration/test_engine.py)
    "LLAVA_MAX_BATCH_SIZE": "4",
    "LLAVA_MAX_BATCH_WAIT_MS": "300",
    "LLAVA_FAULT_OOM_ABOVE_BATCH": "2",  # batches of 3-4 run out of memory and are split
    "LLAVA_FAULT_OOM_MARKER": "[huge]",
    "LLAVA_FAULT_SLOW_MARKER": "[slow]",
    "LLAVA_FAULT_SLOW_STEP_S": "0.5",
}
IMAGE_FILES = ["stop_sign.jpg", "radar_chart.png", "transparent_logo.png", "stop_sign.jpg"]


@pytest.fixture(scope="module")
def batch_worker(start_worker) -> tuple[object, str, str]:
    queue = f"batch-{uuid.uuid4().hex[:8]}"
    worker, hostname = start_worker(queue, **WORKER_ENV)
    return worker, hostname, queue


def test_batched_jobs_match_unbatched_and_oom_splits_the_batch(client: LlavaClient, batch_worker) -> None:
    worker, _, queue = batch_worker
    prompts = ["What is this?", "Describe the colours.", "Any text?", "What is this?"]
    jobs = [
        client.vqa(IMAGES / f, p, queue=queue, max_new_tokens=8)
        for f, p in zip(IMAGE_FILES, prompts, strict=True)
    ]
    together = [job.get() for job in jobs]
    pairs = list(zip(IMAGE_FILES, prompts, strict=True))
    alone = [client.vqa(IMAGES / f, p, queue=queue, max_new_tokens=8).get() for f, p in pairs]
    assert [r.text for r in together] == [r.text for r in alone]
    assert max(r.timings.batch_size for r in together) > 2  # they did batch, and survived the OOM
    assert {r.timings.batch_size for r in alone} == {1}
    assert "out of memory with a batch of" in worker.log_path.read_text()


def test_a_job_that_never_fits_fails_alone(client: LlavaClient, batch_worker) -> None:
    queue = batch_worker[2]
    huge = client.vqa(IMAGES / "stop_sign.jpg", "[huge] everything", queue=queue, max_new_tokens=8)
    others = [
        client.vqa(IMAGES / "radar_chart.png", f"Question {i}?", queue=queue, max_new_tokens=8)
        for i in range(2)
    ]
    with pytest.raises(ResourceExhausted) as error:
        huge.get()
    assert error.value.code == "resource_exhausted"
    assert all(job.get().generated_tokens >= 1 for job in others)


def test_a_job_past_its_deadline_times_out_without_blocking_others(client: LlavaClient, batch_worker) -> None:
    queue = batch_worker[2]
    started = time.monotonic()
    slow = client.caption(
        IMAGES / "stop_sign.jpg", "[slow] take your time", queue=queue, max_new_tokens=30, timeout_s=1.5
    )
    others = [client.caption(IMAGES / "radar_chart.png", queue=queue, max_new_tokens=4) for _ in range(3)]
    with pytest.raises(JobTimeout) as error:
        slow.get()
    assert error.value.code == "timeout"
    assert all(job.get().generated_tokens >= 1 for job in others)
    assert time.monotonic() - started < 10  # 30 slow steps would take 15 s
