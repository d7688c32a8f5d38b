"""A real worker against image servers that drip their response headers: every fetch ends within its one
wall-clock budget, the worker keeps serving, and a warm shutdown aborts fetches when its grace ends."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from producer import LlavaClient
from producer.errors import FetchFailed, JobTimeout, LlavaError
from producer.settings import load_settings
from tests.integration.conftest import IMAGES, TINY_CONFIG, wait_for
from tests.integration.image_server import ImageServer
from worker.settings import WorkerSettings

DEADLINE = 3.0  # LLAVA_FETCH_DEADLINE: the whole fetch, all retries included
MARGIN = 15.0  # generous: the worker's pickup and the result's trip back through Redis
WORKER_ENV = {
    "LLAVA_FETCH_ALLOW": "127.0.0.1/32",
    "LLAVA_FETCH_DEADLINE": str(DEADLINE),
    "LLAVA_FETCH_TIMEOUT": "2",  # above the server's 0.3 s between bytes: a per-read timeout never fires
    "LLAVA_FETCH_RETRIES": "2",
}


def tiny_threads() -> int:
    """The tiny worker's task threads (2 x max_batch_size + fetch_threads)."""
    return load_settings(WorkerSettings, config_file=TINY_CONFIG).threads


def test_a_worker_full_of_dripping_fetches_ends_them_all_and_serves_a_normal_job(
    client: LlavaClient, start_worker, image_server: ImageServer
) -> None:
    queue = f"drip-{uuid.uuid4().hex[:8]}"
    start_worker(queue, **WORKER_ENV)
    count = tiny_threads()
    before = image_server.hits["/drip-headers"]
    started = time.monotonic()
    dripping = [client.caption(image_server.url("/drip-headers"), queue=queue) for _ in range(count)]
    capped = client.caption(image_server.url("/drip-headers"), queue=queue, timeout_s=1.5)
    normal = client.caption(IMAGES / "radar_chart.png", queue=queue, max_new_tokens=4)
    for job in dripping:
        with pytest.raises(FetchFailed) as error:
            job.get(timeout=DEADLINE + MARGIN)
        assert f"{DEADLINE:g} s (fetch_deadline)" in error.value.message
    assert time.monotonic() - started < DEADLINE + MARGIN
    with pytest.raises(JobTimeout):  # the job's own deadline (timeout_s) caps its fetch
        capped.get(timeout=DEADLINE + MARGIN)
    assert normal.get(timeout=60).generated_tokens >= 1
    assert image_server.hits["/drip-headers"] - before >= count + 1  # every job really was fetching


def test_sigterm_during_a_dripping_fetch_exits_within_the_grace_and_requeues_the_job(
    client: LlavaClient, start_worker, image_server: ImageServer
) -> None:
    queue = f"drip-term-{uuid.uuid4().hex[:8]}"
    grace = 1.0
    # the default job_timeout (600 s) and visibility timeout: the fetch alone would take 120 s
    slow = {**WORKER_ENV, "LLAVA_FETCH_DEADLINE": "120", "LLAVA_SHUTDOWN_GRACE": str(grace)}
    first, _ = start_worker(queue, **slow)
    before = image_server.hits["/drip-headers"]
    job = client.caption(image_server.url("/drip-headers"), queue=queue)
    wait_for(lambda: image_server.hits["/drip-headers"] > before, 30, "the worker to start fetching")
    stopped = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - stopped < grace + MARGIN  # not the 120 s fetch deadline
    log = first.log_path.read_text()
    assert "image fetch(es) aborted" in log and not job.ready()
    # the job went back to the queue: the next worker takes it (and gives up on it in its own budget)
    start_worker(queue, **{**WORKER_ENV, "LLAVA_FETCH_DEADLINE": "1", "LLAVA_FETCH_RETRIES": "0"})
    with pytest.raises(LlavaError) as error:
        job.get(timeout=60)
    assert error.value.code == "fetch_failed"
    assert image_server.hits["/drip-headers"] - before == 2
