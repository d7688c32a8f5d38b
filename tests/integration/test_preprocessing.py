"""The preprocessing pool (``preprocess_workers``) on the real tiny checkpoint: the same tensors and the same
answers as the processor in the job's thread, a coded error for the job whose process is killed (and the next
job served), jobs sent back at the end of a warm shutdown's grace, and a worker that stops with its pool."""

from __future__ import annotations

import base64
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from producer import CaptionResult, LlavaClient
from producer.errors import InternalError
from tests.integration.conftest import IMAGES, StartWorker, health, wait_for
from worker.runtime import Prompt
from worker.runtime.preprocessing import PreprocessPool
from worker.service import JobContext, Requeue, Service
from worker.settings import WorkerSettings

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

WAIT = 120  # seconds: a generous bound on any wait


def _service(checkpoint: Path, workers: int) -> Service:
    settings = WorkerSettings(
        model=str(checkpoint), device="cpu", dtype="float32", preprocess_workers=workers
    )
    service = Service(settings)
    service.start()
    return service


@pytest.fixture(scope="module")
def in_thread(tiny_checkpoint: Path) -> Iterator[Service]:
    service = _service(tiny_checkpoint, 0)
    yield service
    service.stop()


@pytest.fixture
def pooled(tiny_checkpoint: Path) -> Iterator[Service]:
    service = _service(tiny_checkpoint, 1)
    yield service
    service.stop()


def _uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


def _caption(service: Service, image: str, job: str = "job") -> dict[str, Any]:
    request = {"image": image, "generation": {"max_new_tokens": 12}}
    return service.run("llava.caption", request, JobContext(job, "test"))


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_pool_gives_the_same_tensors_and_answers_as_the_job_thread(
    in_thread: Service, pooled: Service
) -> None:
    runtime, pool = in_thread.host.runtime, pooled.host.preprocess
    assert runtime is not None and pool is not None and in_thread.host.preprocess is None
    prompts = [
        Prompt(Image.open(IMAGES / "stop_sign.jpg").convert("RGB"), "What does the sign say?"),
        Prompt(Image.new("RGB", (100, 300), (10, 200, 10)), "What colour is this?"),
        Prompt(Image.open(IMAGES / "radar_chart.png").convert("RGB"), "Describe the chart."),
    ]
    for prompt in prompts:
        alone = runtime.prepare(prompt, reserve=8)
        shipped = runtime.prepare(
            prompt, reserve=8, processor=functools.partial(pool, deadline=time.monotonic() + WAIT)
        )
        assert torch.equal(alone.input_ids, shipped.input_ids)
        assert torch.equal(alone.pixel_values, shipped.pixel_values)
        assert torch.equal(alone.image_size, shipped.image_size)
        assert alone.image_tokens == shipped.image_tokens
    for name in ("radar_chart.png", "stop_sign.jpg"):
        expected, got = _caption(in_thread, _uri(name)), _caption(pooled, _uri(name))
        assert got["text"] == expected["text"] and got["generated_tokens"] == expected["generated_tokens"]
        assert got["prompt_tokens"] == expected["prompt_tokens"]
    health = pooled.health()["preprocessing"]
    assert health["workers"] == 1 and len(health["pids"]) == 1 and health["restarts"] == 0


def test_a_job_whose_preprocessing_process_is_killed_gets_a_coded_error_and_the_next_job_is_served(
    in_thread: Service, pooled: Service
) -> None:
    pool, pid, thread, outcome = _job_on_a_stopped_process(pooled, "doomed")
    os.kill(pid, signal.SIGKILL)
    thread.join(WAIT)
    error = outcome.get("error")
    assert isinstance(error, InternalError) and error.code == "internal_error"
    assert "preprocessing process running this job died" in error.message
    assert pooled.health()["last_error"]["job_id"] == "doomed"

    served = _caption(pooled, _uri("radar_chart.png"), "next")
    assert served["text"] == _caption(in_thread, _uri("radar_chart.png"))["text"]
    status = pool.status()
    assert status["restarts"] == 1 and status["pids"] and pid not in status["pids"]


def test_jobs_waiting_on_the_pool_go_back_to_the_queue_when_the_grace_ends_and_the_pool_stops(
    pooled: Service,
) -> None:
    _, pid, thread, outcome = _job_on_a_stopped_process(pooled, "late")  # the grace ends first
    pooled.begin_shutdown(grace=0.0)
    thread.join(WAIT)
    assert isinstance(outcome.get("error"), Requeue)
    pooled.stop()
    wait_for(lambda: not _running(pid), WAIT, "the stopped preprocessing process to be gone")


def test_a_worker_with_a_preprocessing_pool_serves_and_stops_cleanly(
    client: LlavaClient, shared_worker: tuple[Any, str, str], start_worker: StartWorker
) -> None:
    queue = f"pool-{os.getpid()}"
    worker, hostname = start_worker(queue, LLAVA_PREPROCESS_WORKERS="1")
    result = client.caption(IMAGES / "stop_sign.jpg", queue=queue).get(timeout=WAIT)
    reference = client.caption(IMAGES / "stop_sign.jpg", queue=shared_worker[2]).get(timeout=WAIT)
    assert isinstance(result, CaptionResult) and result.worker == hostname
    assert result.text == reference.text
    info = health(client, hostname)
    assert info["preprocessing"]["workers"] == 1 and info["image_processor"]
    [pid] = info["preprocessing"]["pids"]
    assert worker.stop() == 0, worker.log_tail()
    wait_for(lambda: not _running(pid), WAIT, "the worker's preprocessing process to be gone")


def test_the_fast_image_processor_is_used_where_torchvision_imports(in_thread: Service) -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        expected = "LlavaNextImageProcessorPil"
    else:
        expected = "LlavaNextImageProcessor"
    assert in_thread.health()["image_processor"] == expected


def _job_on_a_stopped_process(
    pooled: Service, job_id: str
) -> tuple[PreprocessPool, int, threading.Thread, dict[str, BaseException]]:
    """A caption job waiting on the pool's one process, stopped (SIGSTOP) so that it never finishes the job:
    the pool, that process's pid, the job's thread and where its error lands."""
    pool = pooled.host.preprocess
    assert pool is not None
    [pid] = pool.status()["pids"]
    os.kill(pid, signal.SIGSTOP)
    outcome: dict[str, BaseException] = {}

    def job() -> None:
        try:
            _caption(pooled, _uri("radar_chart.png"), job_id)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    wait_for(lambda: pool.status()["in_flight"] == 1, WAIT, "the job to wait on the preprocessing pool")
    return pool, pid, thread, outcome
