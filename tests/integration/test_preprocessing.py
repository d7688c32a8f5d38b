"""The preprocessing pool (``preprocess_workers``) on the real tiny checkpoint: the same tensors and the same
answers as the processor in the job's thread; a process killed or hung costs at most the job it held (a killed
one's job runs again on its replacement, one that kills it twice fails alone, a hung one's ends ``timeout``)
and is replaced; jobs sent back at the end of a warm shutdown's grace, a worker that stops with its pool."""

from __future__ import annotations

import base64
import functools
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from PIL import Image

from producer import CaptionResult, LlavaClient
from producer.errors import InternalError, JobTimeout
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


@pytest.fixture
def paired(tiny_checkpoint: Path) -> Iterator[Service]:
    service = _service(tiny_checkpoint, 2)
    yield service
    service.stop()


def _uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((IMAGES / name).read_bytes()).decode()


def _caption(
    service: Service, image: str, job: str = "job", timeout_s: float | None = None
) -> dict[str, Any]:
    request = {"image": image, "generation": {"max_new_tokens": 12}, "timeout_s": timeout_s}
    return service.run("llava.caption", request, JobContext(job, "test"))


def _job_thread(service: Service, job_id: str, outcomes: dict[str, Any]) -> threading.Thread:
    """A caption job in a thread of its own (started); its result or its error lands in ``outcomes``."""

    def job() -> None:
        try:
            outcomes[job_id] = _caption(service, _uri("radar_chart.png"), job_id)
        except BaseException as exc:
            outcomes[job_id] = exc

    thread = threading.Thread(target=job)
    thread.start()
    return thread


class _ExitsWhenUnpickled:
    """An "image" whose unpickling ends the process reading it: a job that kills its child every time."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (3,)


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


def test_a_killed_process_fails_none_of_the_jobs_waiting_and_is_replaced(
    in_thread: Service, paired: Service
) -> None:
    pool = paired.host.preprocess
    assert pool is not None
    killed, held = pool.status()["pids"]
    for pid in (killed, held):  # both children hold a job, ten more jobs wait for them
        os.kill(pid, signal.SIGSTOP)
    outcomes: dict[str, Any] = {}
    threads = [_job_thread(paired, f"job-{n}", outcomes) for n in range(12)]
    wait_for(lambda: pool.status()["in_flight"] == 12, WAIT, "the twelve jobs to wait on the pool")
    os.kill(killed, signal.SIGKILL)  # its job runs again on the child that replaces it
    os.kill(held, signal.SIGCONT)
    for thread in threads:
        thread.join(WAIT)
    expected = _caption(in_thread, _uri("radar_chart.png"))["text"]
    texts = {job: out["text"] if isinstance(out, dict) else out for job, out in outcomes.items()}
    assert texts == {f"job-{n}": expected for n in range(12)}
    status, health = pool.status(), paired.health()
    assert status["restarts"] == 1 and len(status["pids"]) == 2 and killed not in status["pids"]
    assert health["jobs_failed"] == 0 and health["preprocessing"]["restarts"] == 1


def test_a_job_that_kills_its_process_twice_fails_alone_with_a_coded_error(
    in_thread: Service, pooled: Service
) -> None:
    pool = pooled.host.preprocess
    assert pool is not None
    [pid] = pool.status()["pids"]
    with pytest.raises(InternalError) as raised:
        pool(
            images=[cast(Image.Image, _ExitsWhenUnpickled())],
            text=["poison"],
            return_tensors="pt",
            deadline=time.monotonic() + WAIT,
        )
    assert raised.value.code == "internal_error"
    assert "preprocessing process running this job died twice" in raised.value.message
    status = pool.status()
    assert status["restarts"] == 2 and pid not in status["pids"]
    served = _caption(pooled, _uri("radar_chart.png"), "next")
    assert served["text"] == _caption(in_thread, _uri("radar_chart.png"))["text"]


def test_a_hung_process_is_replaced_at_its_jobs_deadline_and_later_jobs_are_served(
    in_thread: Service, pooled: Service
) -> None:
    pool = pooled.host.preprocess
    assert pool is not None
    [hung] = pool.status()["pids"]
    os.kill(hung, signal.SIGSTOP)
    with pytest.raises(JobTimeout):
        _caption(pooled, _uri("radar_chart.png"), "stuck", timeout_s=3.0)
    status = pool.status()
    assert status["restarts"] == 1 and hung not in status["pids"]
    wait_for(lambda: not _running(hung), WAIT, "the hung preprocessing process to be killed")
    served = _caption(pooled, _uri("radar_chart.png"), "later")
    assert served["text"] == _caption(in_thread, _uri("radar_chart.png"))["text"]
    assert pooled.health()["preprocessing"]["restarts"] == 1


def test_jobs_waiting_on_the_pool_go_back_to_the_queue_when_the_grace_ends_and_the_pool_stops(
    pooled: Service,
) -> None:
    _, pid, thread, outcome = _job_on_a_stopped_process(pooled, "late")  # the grace ends first
    pooled.begin_shutdown(grace=0.0)
    thread.join(WAIT)
    assert isinstance(outcome.get("late"), Requeue)
    pooled.stop()
    wait_for(lambda: not _running(pid), WAIT, "the stopped preprocessing process to be gone")


def test_a_worker_with_a_preprocessing_pool_serves_and_stops_cleanly_with_a_hung_process(
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
    os.kill(pid, signal.SIGSTOP)  # hung: the warm shutdown still ends within stop()'s bound
    assert worker.stop() == 0, worker.log_tail()
    wait_for(lambda: not _running(pid), WAIT, "the worker's hung preprocessing process to be gone")


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
) -> tuple[PreprocessPool, int, threading.Thread, dict[str, Any]]:
    """A caption job waiting on the pool's one process, stopped (SIGSTOP) so that it never finishes the job:
    the pool, that process's pid, the job's thread and where its outcome lands (under ``job_id``)."""
    pool = pooled.host.preprocess
    assert pool is not None
    [pid] = pool.status()["pids"]
    os.kill(pid, signal.SIGSTOP)
    outcome: dict[str, Any] = {}
    thread = _job_thread(pooled, job_id, outcome)
    wait_for(lambda: pool.status()["in_flight"] == 1, WAIT, "the job to wait on the preprocessing pool")
    return pool, pid, thread, outcome
