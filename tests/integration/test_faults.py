"""Nothing lost: real worker processes killed, poisoned, stopped mid-batch, and Redis restarted under them.

Tests use a visibility timeout of seconds (production: an hour; see README "Losing nothing"). Each test runs
on a Redis of its own: workers on one broker must share one visibility timeout (a worker refuses to start
otherwise), and the other test modules' workers use the default. The poison job among batch mates is in
test_poison.py (the two files take about the same time: ``--dist loadfile`` runs them side by side)."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.devstack import RedisServer
from producer import ClientSettings, LlavaClient, WorkerLost
from producer.errors import InvalidImage
from producer.images import data_uri
from tests.integration.conftest import IMAGES, Stack, WorkerCli, health, wait_for
from tests.integration.fault_tools import FAST_FETCH, SLOW, crash_until_verdict, in_flight, queue_name

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)


def test_sigkill_mid_jobs_then_another_worker_finishes_all(stack: Stack) -> None:
    client, queue = stack.client, queue_name("kill")
    # The jobs only have to be decoding when the kill comes (in_flight answers in milliseconds): job_timeout
    # leaves seconds for that and for the second worker's unslowed run; the visibility timeout is its floor.
    env = {**FAST_FETCH, "LLAVA_VISIBILITY_TIMEOUT": "8", "LLAVA_JOB_TIMEOUT": "5"}
    first, hostname = stack.start(queue, **env, **SLOW)
    jobs = [
        client.caption(IMAGES / "stop_sign.jpg", f"[slow] job {i}", queue=queue, max_new_tokens=30)
        for i in range(4)
    ]
    wait_for(lambda: in_flight(client, hostname) == 4, 30, "the jobs to reach the model")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    assert [job.state for job in jobs] == ["PENDING"] * 4
    _, second = stack.start(queue, **env)  # without the slow fault
    assert all(job.get(timeout=60).worker == second for job in jobs)


def test_poison_job_fails_with_worker_lost_after_the_cap(stack: Stack) -> None:
    client, queue = stack.client, queue_name("poison")
    env = {
        **FAST_FETCH,
        "LLAVA_VISIBILITY_TIMEOUT": "6",
        "LLAVA_JOB_TIMEOUT": "3",  # a loaded CI machine needs more than a second for the good jobs
        "LLAVA_MAX_DELIVERIES": "2",
        "LLAVA_CONCURRENCY": "1",
        "LLAVA_MAX_BATCH_SIZE": "1",
        "LLAVA_FAULT_CRASH_MARKER": "[crash]",
    }
    poison = client.caption(IMAGES / "stop_sign.jpg", "[crash] me", queue=queue, max_new_tokens=4)
    others = [client.caption(IMAGES / "radar_chart.png", queue=queue, max_new_tokens=4) for _ in range(2)]

    def killed(process: Any, crashes: int) -> None:
        assert process.returncode == -signal.SIGKILL

    crashes = crash_until_verdict(stack, queue, env, poison, killed, cap=2)
    with pytest.raises(WorkerLost) as error:
        poison.get()
    assert error.value.code == "worker_lost" and "max_deliveries 2" in error.value.message
    assert crashes == 2
    assert all(job.get(timeout=60).generated_tokens >= 1 for job in others)


def test_a_worker_with_another_visibility_timeout_refuses_to_start(
    worker_cli: WorkerCli, shared_worker
) -> None:
    """Refused before it loads a model or consumes: the CLI runs in-process next to the session's workers."""
    _, peer, _ = shared_worker  # the default visibility timeout: 3600 s
    # The peer's reply must come within the peer check's timeout: 2 s, room for a loaded machine (the
    # session's workers use 0.3 s, and a late reply would let this worker start).
    status, output = worker_cli(
        "--queues", queue_name("vt"), LLAVA_VISIBILITY_TIMEOUT="7200", LLAVA_PEER_CHECK_TIMEOUT="2"
    )
    assert status == 1, output
    assert "another visibility timeout" in output and f"{peer}: 3600" in output
    assert output.count("llava-worker: cannot start") == 1


def test_sigterm_mid_batch_requeues_and_exits_zero(stack: Stack) -> None:
    client, queue = stack.client, queue_name("term")
    env = {
        **FAST_FETCH,
        "LLAVA_VISIBILITY_TIMEOUT": "60",
        "LLAVA_JOB_TIMEOUT": "30",
        "LLAVA_SHUTDOWN_GRACE": "0.5",
    }
    first, hostname = stack.start(queue, **env, **SLOW)
    jobs = [
        client.caption(IMAGES / "stop_sign.jpg", f"[slow] job {i}", queue=queue, max_new_tokens=40)
        for i in range(4)
    ]
    wait_for(lambda: in_flight(client, hostname) == 4, 30, "the batch to be decoding")  # 40 steps x 0.2 s
    started = time.monotonic()
    assert first.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 15
    assert "go back to the queue" in first.log_path.read_text()
    stack.start(queue, **env)
    assert all(job.get(timeout=60).generated_tokens >= 1 for job in jobs)


def test_redis_restart_loses_nothing(tmp_path: Path, start_worker, cache_dir) -> None:
    server = RedisServer(data_dir=tmp_path / "redis").start()
    # A waiting get() reconnects for about LLAVA_BROKER_TIMEOUT: give it more than this restart takes.
    settings = ClientSettings(
        broker_url=server.url(0), result_backend=server.url(1), result_timeout=90, broker_timeout=30
    )
    own = LlavaClient(settings)
    try:
        queue = queue_name("restart")
        env = {
            **FAST_FETCH,
            "LLAVA_BROKER_URL": settings.broker_url,
            "LLAVA_RESULT_BACKEND": settings.result_backend,
        }
        worker, hostname = start_worker(queue, wait=False, **env, **SLOW)
        worker.wait_ready(own.app, hostname)
        jobs = [
            own.caption(IMAGES / "radar_chart.png", f"[slow] {i}", queue=queue, max_new_tokens=30)
            for i in range(6)  # 30 steps x 0.2 s: still decoding while Redis is away
        ]
        blocked: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: blocked.update(result=jobs[-1].get(timeout=90)))
        waiter.start()
        wait_for(lambda: in_flight(own, hostname) > 0, 30, "the first jobs to reach the model")
        server.stop()  # SIGTERM: Redis writes its AOF and exits
        lost = "Connection to broker lost"
        wait_for(lambda: lost in worker.log_path.read_text(), 30, "the worker to notice Redis is gone")
        server.start()  # same port, same data dir
        results = [job.get(timeout=90) for job in jobs]
        waiter.join(90)
        assert all(r.worker == hostname for r in results)
        assert blocked["result"] == results[-1]
    finally:
        own.close()
        server.stop()


def test_resending_a_succeeded_job_id_returns_the_stored_result(client: LlavaClient, shared_worker) -> None:
    worker, hostname, queue = shared_worker
    job_id = f"order-{uuid.uuid4().hex}"
    first = client.caption(IMAGES / "stop_sign.jpg", queue=queue, job_id=job_id).get()
    done_before = health(client, hostname)["jobs_done"]
    again = client.caption(IMAGES / "stop_sign.jpg", queue=queue, job_id=job_id)
    assert again.id == job_id and again.get() == first  # same timings: it did not run again
    answered = f"llava.caption[{job_id}] succeeded"  # Celery's line once the task returned (after its result)
    answers = lambda: worker.log_path.read_text().count(answered)  # noqa: E731
    wait_for(lambda: answers() == 1, 60, "the first run's line")  # the resend above was not sent: stored
    client.app.send_task("llava.caption", task_id=job_id, kwargs={"request": {"image": "/nope"}}, queue=queue)
    # A worker that receives a succeeded id returns the stored result, not an error.
    wait_for(lambda: answers() == 2, 60, "the resent id's answer")
    assert f"job {job_id} already succeeded" in worker.log_path.read_text()
    assert client.job(job_id, "llava.caption").get() == first
    assert health(client, hostname)["jobs_done"] == done_before


def test_a_failed_job_delivered_again_keeps_its_stored_error(client: LlavaClient, start_worker) -> None:
    """A job whose failure is stored, its message delivered again as kombu restores it (the acknowledgement
    lost in a failover; here with a good image, to tell the runs apart): the worker raises the stored error
    again instead of running it, and the producer's outcome stays the first (it saw two for one id)."""
    queue = queue_name("again")
    worker, _ = start_worker(queue)
    job = client.caption(b"not an image at all", queue=queue)
    with pytest.raises(InvalidImage):
        job.get(timeout=60)
    worker.stop()
    good = {"image": data_uri((IMAGES / "stop_sign.jpg").read_bytes())}
    client.app.send_task("llava.caption", task_id=job.id, kwargs={"request": good}, queue=queue)
    broker = redis.Redis.from_url(client.settings.broker_url)
    (key,) = [key for key in broker.keys(f"{queue}*") if broker.type(key) == b"list"]
    payload = json.loads(broker.rpop(key))
    payload["headers"]["redelivered"] = payload["properties"]["delivery_info"]["redelivered"] = True
    broker.rpush(key, json.dumps(payload))  # what kombu's restore (_do_restore_message) sends back
    again, _ = start_worker(queue)
    wait_for(lambda: f"job {job.id} already failed" in again.log_path.read_text(), 60, "the redelivery")
    with pytest.raises(InvalidImage):
        client.job(job.id, "llava.caption").get(timeout=60)
