"""The fleet: one worker per GPU (launcher, exercised with --device cpu; each with its own metrics port),
routing by model, priorities."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid

import pytest

from devtools.devstack import free_port
from producer import LlavaClient
from producer.status import cluster_status, queue_depths, worker_health
from tests.integration.conftest import IMAGES, ROOT, TINY_CONFIG, health, wait_for, worker_env
from tests.integration.test_metrics import answers, port_is_free, scrape

pytestmark = pytest.mark.long  # started first by pytest-xdist (tests/conftest.py)

HOST = socket.gethostname()


def test_launcher_runs_one_supervised_worker_per_gpu(
    client: LlavaClient, client_settings, cache_dir, tmp_path
) -> None:
    """``llava-worker --gpus 0,1``: a worker per GPU index, each on its own GPU and on its own metrics port
    (the base port + its index), the one that crashes restarted, all stopped by SIGTERM."""
    base = free_port()
    while not port_is_free(base + 1):
        base = free_port()
    queue = f"fleet-{uuid.uuid4().hex[:8]}"
    log = open(tmp_path / "launcher.log", "wb")  # noqa: SIM115
    parent = subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(TINY_CONFIG), "--gpus", "0,1", "--device", "cpu",
         "--queues", queue],
        env=worker_env(client_settings, cache_dir, LLAVA_METRICS_PORT=str(base)), stdout=log,
        stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    nodes = {f"gpu0@{HOST}", f"gpu1@{HOST}"}
    try:
        online = lambda: worker_health(client.app, 1.0, nodes=sorted(nodes))  # noqa: E731
        wait_for(lambda: nodes <= set(online()), 90, "gpu0 and gpu1 online")
        every = worker_health(client.app, 10, nodes=sorted(nodes))
        assert {every[f"gpu{i}@{HOST}"]["cuda_visible_devices"] for i in (0, 1)} == {"0", "1"}
        wait_for(lambda: answers(base) and answers(base + 1), 60, "metrics of gpu0 and gpu1")
        for gpu in (0, 1):
            [(_, labels)] = [key for key in scrape(base + gpu) if key[0] == "llava_worker_info"]
            assert dict(labels)["gpu"] == str(gpu), "each port is its own GPU's worker"
        assert {client.caption(IMAGES / "stop_sign.jpg", queue=queue).get().worker for _ in range(6)} <= nodes
        old_pid = every[f"gpu1@{HOST}"]["pid"]
        subprocess.run(["kill", "-9", str(old_pid)], check=True)
        restarted = lambda: health(client, f"gpu1@{HOST}", timeout=1.0).get("pid")  # noqa: E731
        wait_for(lambda: restarted() not in (None, old_pid), 90, "the crashed gpu1 worker to be restarted")
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 0
        assert not nodes & set(worker_health(client.app))
    finally:
        if parent.poll() is None:
            parent.kill()
        log.close()
    assert "restarting in" in (tmp_path / "launcher.log").read_text()


def test_jobs_go_to_the_workers_of_their_model(client: LlavaClient, start_worker) -> None:
    alpha, beta = f"alpha-{uuid.uuid4().hex[:6]}", f"beta-{uuid.uuid4().hex[:6]}"
    alpha_worker, alpha_node = start_worker(
        None, wait=False, LLAVA_MODEL_NAME=alpha, LLAVA_CONSUME_DEFAULT_QUEUE="false"
    )
    beta_worker, beta_node = start_worker(
        None, wait=False, LLAVA_MODEL_NAME=beta, LLAVA_CONSUME_DEFAULT_QUEUE="false"
    )
    alpha_worker.wait_ready(client.app, alpha_node)  # the two load their models meanwhile
    beta_worker.wait_ready(client.app, beta_node)
    for _ in range(3):
        assert client.caption(IMAGES / "stop_sign.jpg", model=alpha).get().worker == alpha_node
        assert client.vqa(IMAGES / "stop_sign.jpg", "Which?", model=beta).get().worker == beta_node
    nobody = f"gamma-{uuid.uuid4().hex[:6]}"
    stranded = client.caption(IMAGES / "stop_sign.jpg", model=nobody)
    waiting = lambda: queue_depths(client.app, [f"llava.{nobody}"])[f"llava.{nobody}"]  # noqa: E731
    wait_for(lambda: waiting() == 1, 30, "the job to wait on its queue")
    status = cluster_status(client.app, [client.settings.default_queue])  # every worker's view: one broadcast
    assert status["queues"].get(f"llava.{nobody}") == 1
    assert stranded.state == "PENDING"
    assert f"llava.{nobody}" not in status["served_queues"]
    assert f"llava.{alpha}" in status["served_queues"]


def test_a_high_priority_job_overtakes_low_priority_ones(client: LlavaClient, start_worker) -> None:
    queue = f"prio-{uuid.uuid4().hex[:8]}"
    low = [
        client.caption(IMAGES / "radar_chart.png", queue=queue, priority=0, max_new_tokens=2)
        for _ in range(20)
    ]
    high = client.caption(IMAGES / "stop_sign.jpg", queue=queue, priority=9, max_new_tokens=2)
    start_worker(queue, LLAVA_CONCURRENCY="1", LLAVA_MAX_BATCH_SIZE="1")
    high.get()
    [job.get() for job in low]
    done = {job.id: client.app.AsyncResult(job.id).date_done for job in [*low, high]}
    ahead = sum(done[job.id] < done[high.id] for job in low)
    assert ahead <= 3, f"{ahead} of 20 low-priority jobs finished before the high-priority one"


def test_workers_of_one_queue_with_other_caps_are_named_at_start_and_in_status(
    client: LlavaClient, start_worker
) -> None:
    """Two workers of one queue, their token caps different: the same request would succeed on one and be
    refused by the other. The second one's start names the difference, and so does `llava-queue status`."""
    queue = f"caps-{uuid.uuid4().hex[:6]}"
    _, first = start_worker(queue, LLAVA_MAX_NEW_TOKENS_CAP="256")
    second, _ = start_worker(queue, LLAVA_MAX_NEW_TOKENS_CAP="512", LLAVA_PEER_CHECK_TIMEOUT="2")
    assert f"LLAVA_MAX_NEW_TOKENS_CAP is 512 here, {first}: 256" in second.log_tail(400)
    warnings = cluster_status(client.app, [queue], timeout=2.0)["warnings"]
    assert any(f"queue {queue}" in line and "LLAVA_MAX_NEW_TOKENS_CAP" in line for line in warnings), warnings
