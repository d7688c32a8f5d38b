"""Prometheus metrics scraped from a live tiny worker. That each worker of the launcher serves them on
the base port + its GPU index is checked by test_fleet.py's launcher test (one launcher run checks both)."""

from __future__ import annotations

import socket
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.devstack import free_port
from producer import FetchFailed, LlavaClient
from tests.integration.conftest import IMAGES, StartWorker
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


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
