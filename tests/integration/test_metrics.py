"""Prometheus metrics scraped from live tiny workers: one worker, and one per GPU under the launcher."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack import free_port
from producer import FetchFailed, LlavaClient
from producer.settings import ClientSettings
from producer.status import worker_health
from tests.integration.conftest import IMAGES, ROOT, TINY_CONFIG, StartWorker, wait_for, worker_env
from tests.integration.image_server import ImageServer

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` from ``/metrics`` on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def answers(port: int) -> bool:
    try:
        return value(scrape(port), "llava_model_loaded") == 1
    except OSError:
        return False


def test_a_worker_exports_jobs_latencies_tokens_batches_and_fetch_failures(
    client: LlavaClient, start_worker: StartWorker, image_server: ImageServer
) -> None:
    port, queue = free_port(), f"it-{uuid.uuid4().hex[:8]}"
    start_worker(queue, LLAVA_METRICS_PORT=str(port), LLAVA_FETCH_ALLOW="127.0.0.1", LLAVA_FETCH_RETRIES="0")
    before = scrape(port)
    assert value(before, "llava_jobs_total", kind="caption", outcome="ok") == 0
    caption = client.caption(IMAGES / "stop_sign.jpg", queue=queue).get(timeout=60)
    client.classify(IMAGES / "radar_chart.png", labels=["chart", "sign"], queue=queue).get(timeout=60)
    with pytest.raises(FetchFailed):
        client.caption(image_server.url("/status-500"), queue=queue).get(timeout=60)
    samples = scrape(port)
    assert value(samples, "llava_jobs_total", kind="caption", outcome="ok") == 1
    assert value(samples, "llava_jobs_total", kind="classify", outcome="ok") == 1
    assert value(samples, "llava_jobs_total", kind="caption", outcome="fetch_failed") == 1
    assert value(samples, "llava_image_fetch_failures_total", code="fetch_failed") == 1
    for phase in ("queued", "image", "preprocess", "batch_wait", "inference", "total"):
        assert value(samples, "llava_job_phase_seconds_count", kind="caption", phase=phase) == 1
    total = value(samples, "llava_job_phase_seconds_sum", kind="caption", phase="total")
    assert total == pytest.approx(caption.timings.total_ms / 1000)
    assert value(samples, "llava_generated_tokens_total", kind="caption") == caption.generated_tokens > 0
    assert value(samples, "llava_prompt_tokens_total", kind="caption") == caption.prompt_tokens
    assert value(samples, "llava_job_batch_size_count") == 2
    # The default continuous engine: decode steps, rows, KV tokens (the static batcher: batches and rows).
    assert value(samples, "llava_decode_steps_total") >= caption.generated_tokens - 1
    assert value(samples, "llava_running_rows") == 0 and value(samples, "llava_kv_tokens_reserved") == 0
    assert value(samples, "llava_kv_tokens_budget") > 0
    assert value(samples, "llava_jobs_in_flight") == 0
    assert value(samples, "llava_model_loaded") == 1 and value(samples, "llava_model_loads_total") == 1
    assert value(samples, "llava_memory_rss_bytes") > 10e6


def test_each_worker_of_the_launcher_serves_metrics_on_base_port_plus_gpu_index(
    client: LlavaClient, client_settings: ClientSettings, cache_dir: Path, tmp_path: Path
) -> None:
    base = free_port()
    while not port_is_free(base + 1):
        base = free_port()
    env = worker_env(client_settings, cache_dir, LLAVA_METRICS_PORT=str(base))
    queue = f"m-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "worker", "--config", str(TINY_CONFIG), "--queues", queue,
               "--gpus", "0,1", "--device", "cpu"]  # fmt: skip
    with open(tmp_path / "launcher.log", "wb") as log:
        parent = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: answers(base) and answers(base + 1), 120, "metrics of gpu0 and gpu1")
        nodes = {f"gpu0@{socket.gethostname()}", f"gpu1@{socket.gethostname()}"}
        wait_for(lambda: nodes <= set(worker_health(client.app)), 60, "gpu0 and gpu1 online")
        for gpu in (0, 1):
            [(_, labels)] = [key for key in scrape(base + gpu) if key[0] == "llava_worker_info"]
            assert dict(labels)["gpu"] == str(gpu), "each port is its own GPU's worker"
    finally:
        parent.terminate()
        assert parent.wait(timeout=60) == 0, (tmp_path / "launcher.log").read_text()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
