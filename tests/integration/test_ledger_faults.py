"""The delivery ledger under broker faults, with real worker processes: a stopped Redis never stalls the
model thread, warm shutdowns never count toward the redelivery cap, and a Redis error on a job's arrival
never becomes its outcome nor ends the worker.

Each test runs on a Redis of its own (``stack``): the tests stop, restart and fill it."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.devstack import RedisServer, free_port
from producer import ClientSettings
from tests.integration.conftest import IMAGES, Stack, stack_on, wait_for
from tests.integration.fault_tools import FAST_FETCH, SLOW, in_flight, queue_name
from tests.integration.test_redis_memory import fill
from worker.attempts import AttemptWriter
from worker.delivery import DeliveryLedger

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

# Jobs decode for seconds (SLOW: 0.2 s a step); a minute of job time, the visibility timeout above it.
ENV = {**FAST_FETCH, "LLAVA_VISIBILITY_TIMEOUT": "90", "LLAVA_JOB_TIMEOUT": "60"}


@pytest.fixture
def split_stack(tmp_path: Path, start_worker) -> Iterator[Stack]:
    """A broker Redis and a result-backend Redis of the test's own (``stack.redis``: the backend, where the
    ledger lives), so that the ledger's Redis fails while jobs still arrive; images travel in the messages."""
    broker = RedisServer(data_dir=tmp_path / "broker").start()
    backend = RedisServer(data_dir=tmp_path / "backend").start()
    settings = ClientSettings(
        broker_url=broker.url(0),
        result_backend=backend.url(0),
        result_timeout=90,
        broker_timeout=30,  # a waiting get() rides out the backend's restart
        blob_store="off",
    )
    with stack_on(backend, settings, start_worker, broker) as own:
        yield own


def send_while_paused(stack: Stack, worker, queue: str, count: int) -> list:
    """``count`` jobs queued while ``worker`` is paused (SIGSTOP): they arrive together once it resumes."""
    worker.process.send_signal(signal.SIGSTOP)
    try:
        return [
            stack.client.caption(IMAGES / "radar_chart.png", f"job {i}", queue=queue, max_new_tokens=4)
            for i in range(count)
        ]
    except BaseException:
        worker.process.send_signal(signal.SIGCONT)
        raise


def held(worker) -> bool:
    return "Redis did not take its arrival" in worker.log_path.read_text()


def decode_steps(port: int) -> float:
    """The engine's decode steps, from the worker's metrics endpoint (health goes over the broker)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = text_string_to_metric_families(text)
    return next(s.value for f in families for s in f.samples if s.name == "llava_decode_steps_total")


def test_rows_keep_decoding_while_redis_is_stopped(stack: Stack) -> None:
    client, queue, port = stack.client, queue_name("sigstop"), free_port()
    _, hostname = stack.start(queue, **ENV, **SLOW, LLAVA_METRICS_PORT=str(port))
    # Short rows end while Redis is stopped (their attempts' ends are ledger writes); the long one goes on.
    lengths = [100, 10, 15, 20, 25]
    jobs = [
        client.caption(IMAGES / "stop_sign.jpg", f"[slow] {n}", queue=queue, max_new_tokens=n)
        for n in lengths
    ]
    wait_for(lambda: in_flight(client, hostname) == len(jobs), 30, "the rows to be decoding")
    stack.redis.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        stopped_at = decode_steps(port)
        # 40 steps: every short row has left (25 steps at most) and the long row still decodes.
        wait_for(lambda: decode_steps(port) >= stopped_at + 40, 60, "decode steps while Redis is stopped")
    finally:
        stack.redis.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    results = [job.get(timeout=90) for job in jobs]
    assert all(result.worker == hostname for result in results)


def test_warm_shutdowns_never_count_toward_the_redelivery_cap(stack: Stack) -> None:
    client, queue = stack.client, queue_name("rolling")
    env = {**ENV, "LLAVA_SHUTDOWN_GRACE": "0.5", "LLAVA_MAX_DELIVERIES": "3"}
    job = client.caption(IMAGES / "radar_chart.png", "[slow] rolling", queue=queue, max_new_tokens=40)
    for restart in range(4):  # one more rolling restart than max_deliveries
        worker, hostname = stack.start(queue, **env, **SLOW)
        on_model = lambda node=hostname: job.ready() or in_flight(client, node) == 1  # noqa: E731
        wait_for(on_model, 30, f"the job on worker {restart + 1}'s model")
        assert not job.ready(), f"the job ended on worker {restart + 1}: {job.state}"
        assert worker.stop(signal.SIGTERM, timeout=30) == 0
        assert "go back to the queue" in worker.log_path.read_text()
    stack.start(queue, **env)  # not slowed: it finishes
    assert job.get(timeout=60).generated_tokens >= 1


def test_jobs_arriving_while_the_ledger_redis_restarts_all_run(split_stack: Stack) -> None:
    stack, queue = split_stack, queue_name("ledger-restart")
    worker, hostname = stack.start(queue, **ENV)
    jobs = send_while_paused(stack, worker, queue, 3)
    stack.redis.stop()  # SIGTERM: Redis writes its AOF and exits
    worker.process.send_signal(signal.SIGCONT)
    wait_for(lambda: held(worker), 30, "the worker to hold a job whose arrival Redis did not take")
    stack.redis.start()  # same port, same data
    assert all(job.get(timeout=90).worker == hostname for job in jobs)
    assert worker.process.poll() is None


def test_a_full_ledger_redis_holds_arriving_jobs_and_the_worker_stays_up(split_stack: Stack) -> None:
    stack, queue = split_stack, queue_name("ledger-full")
    worker, hostname = stack.start(queue, **ENV)
    jobs = send_while_paused(stack, worker, queue, 3)
    backend = redis.Redis.from_url(stack.client.settings.result_backend)
    backend.config_set("maxmemory-policy", "noeviction")
    backend.config_set("maxmemory", 1)  # every write refused: OutOfMemoryError
    try:
        worker.process.send_signal(signal.SIGCONT)
        wait_for(lambda: held(worker), 30, "the worker to hold a job whose arrival Redis refused")
        assert worker.process.poll() is None
    finally:
        backend.config_set("maxmemory", 0)
    assert all(job.get(timeout=90).worker == hostname for job in jobs)
    assert worker.process.poll() is None


def test_attempt_writes_ride_out_a_stopped_redis_and_count_each_attempt_once(tmp_path: Path) -> None:
    """The attempt writer alone, on a real Redis stopped under it: the model thread's calls return while it
    is stopped; the writes time out and are sent again (Redis may still run a first try late); once it is
    back, each attempt that ended counts 0, the one still open counts 1, none twice."""
    server = RedisServer(data_dir=tmp_path / "redis").start()
    bounded = redis.Redis.from_url(
        server.url(0), socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    writer = AttemptWriter(bounded, DeliveryLedger.key, 60)
    try:
        writer.begin(["ran", "open"])
        writer.end(["ran"])
        server.process.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:

            def rows_join_and_leave() -> None:
                writer.begin(["in-doubt", "still-open"])
                writer.end(["in-doubt", "open"])

            model_thread = threading.Thread(target=rows_join_and_leave)
            model_thread.start()
            model_thread.join(30)
            assert not model_thread.is_alive(), "the model thread waited on the stopped Redis"
            time.sleep(2)  # Redis stays stopped past a few write timeouts: the writes go out again
        finally:
            server.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        assert writer.close(30), "the pending writes were not recorded once Redis was back"
        jobs = ["ran", "open", "in-doubt", "still-open"]
        counted = {job: int(bounded.hget(DeliveryLedger.key(job), "attempts") or 0) for job in jobs}
        assert counted == {"ran": 0, "open": 0, "in-doubt": 0, "still-open": 1}
    finally:
        server.stop()


def test_an_outcome_a_full_redis_refuses_is_stored_once_memory_is_back(split_stack: Stack) -> None:
    """The job ran; Redis (the result backend's) is full when its outcome is stored: the store is retried
    with backoff, not dropped, and the producer gets the result once memory is back."""
    stack, queue = split_stack, queue_name("outcome-full")
    worker, hostname = stack.start(queue, **ENV, **SLOW)
    job = stack.client.caption(IMAGES / "stop_sign.jpg", "[slow] full", queue=queue, max_new_tokens=12)
    wait_for(lambda: in_flight(stack.client, hostname) == 1, 30, "the job on the model")
    backend = fill(stack.redis)  # while it decodes (0.2 s a step)
    try:
        refused = "refused a job's outcome"
        wait_for(lambda: refused in worker.log_path.read_text(), 60, "the refused outcome")
    finally:
        backend.config_set("maxmemory", 0)
    assert job.get(timeout=90).worker == hostname


def test_the_model_thread_stops_waiting_for_its_record_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing answers on the port: a row's begin stops waiting for its record as soon as the write fails,
    not after its bound (here made 600 s, so that only the failure can end it)."""
    monkeypatch.setattr("worker.attempts.BEGIN_WAIT_S", 600.0)
    dead = redis.Redis(
        port=free_port(), socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    writer = AttemptWriter(dead, DeliveryLedger.key, 60)
    model_thread = threading.Thread(target=writer.begin, args=(["running"],))
    model_thread.start()
    model_thread.join(60)
    assert not model_thread.is_alive(), "the model thread waited out its bound on a Redis that failed"
