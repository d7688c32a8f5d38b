"""The fleet: one worker per GPU (launcher, exercised with --device cpu), routing by model, priorities."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid

from producer import LlavaClient
from producer.status import cluster_status, worker_health
from tests.integration.conftest import IMAGES, ROOT, TINY_CONFIG, wait_for, worker_env

HOST = socket.gethostname()


def test_launcher_runs_one_supervised_worker_per_gpu(
    client: LlavaClient, client_settings, cache_dir, tmp_path
) -> None:
    queue = f"fleet-{uuid.uuid4().hex[:8]}"
    log = open(tmp_path / "launcher.log", "wb")  # noqa: SIM115
    parent = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "--config", str(TINY_CONFIG), "--gpus", "0,1", "--device", "cpu",
         "--queues", queue],
        env=worker_env(client_settings, cache_dir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    nodes = {f"gpu0@{HOST}", f"gpu1@{HOST}"}
    try:
        wait_for(lambda: nodes <= set(worker_health(client.app)), 90, "gpu0 and gpu1 online")
        health = worker_health(client.app)
        assert {health[f"gpu{i}@{HOST}"]["cuda_visible_devices"] for i in (0, 1)} == {"0", "1"}
        assert {client.caption(IMAGES / "stop_sign.jpg", queue=queue).get().worker for _ in range(6)} <= nodes
        old_pid = health[f"gpu1@{HOST}"]["pid"]
        subprocess.run(["kill", "-9", str(old_pid)], check=True)
        wait_for(lambda: worker_health(client.app).get(f"gpu1@{HOST}", {}).get("pid") not in (None, old_pid),
                 90, "the crashed gpu1 worker to be restarted")  # fmt: skip
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
    _, alpha_node = start_worker(None, LLAVA_MODEL_NAME=alpha, LLAVA_CONSUME_DEFAULT_QUEUE="false")
    _, beta_node = start_worker(None, LLAVA_MODEL_NAME=beta, LLAVA_CONSUME_DEFAULT_QUEUE="false")
    for _ in range(3):
        assert client.caption(IMAGES / "stop_sign.jpg", model=alpha).get().worker == alpha_node
        assert client.vqa(IMAGES / "stop_sign.jpg", "Which?", model=beta).get().worker == beta_node
    nobody = f"gamma-{uuid.uuid4().hex[:6]}"
    stranded = client.caption(IMAGES / "stop_sign.jpg", model=nobody)

    def cluster() -> dict:
        return cluster_status(client.app, [client.settings.default_queue])

    wait_for(lambda: cluster()["queues"].get(f"llava.{nobody}") == 1, 30, "the job to wait on its queue")
    assert stranded.state == "PENDING"
    status = cluster()
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
