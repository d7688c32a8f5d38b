"""Prometheus metrics of one worker process (prometheus-client), served on ``LLAVA_METRICS_PORT``.

Per job, from the success and failure paths of ``Service.run``: jobs by kind and outcome, the latency of each
phase (the result's ``timings``), the batch size each job ran in, prompt and generated tokens, image fetch
failures. Per scrape, from ``Service.health()``: what it serves (model, device, dtype, GPU), model loaded and
loads, jobs in flight, batches and batch rows run, memory (RSS; CUDA allocated, reserved, total). Off unless a
port is set; with ``--gpus``, each child serves on the port plus its GPU index.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from producer.contract import TASKS
from worker.endpoint import Endpoint

if TYPE_CHECKING:
    from producer.errors import LlavaError
    from worker.service import Service

log = logging.getLogger(__name__)

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PHASES = ("queued", "image", "preprocess", "batch_wait", "inference", "total")  # Timings fields, in ms
FETCH_CODES = ("fetch_failed", "fetch_forbidden")

JOBS = Counter(
    "llava_jobs", "Jobs finished, by kind and outcome (ok, or the error code)", ["kind", "outcome"]
)
PHASE_SECONDS = Histogram(
    "llava_job_phase_seconds",
    "Seconds per job phase: queued (sent to started), image (fetch + decode), preprocess (processor), "
    "batch_wait (waiting for the model thread), inference (the model), total (on the worker)",
    ["kind", "phase"],
    buckets=SECONDS,
)
BATCH_SIZE = Histogram(
    "llava_job_batch_size", "Batch size each job ran in", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
PROMPT_TOKENS = Counter(
    "llava_prompt_tokens", "Prompt tokens (image tokens included) of jobs served", ["kind"]
)
GENERATED_TOKENS = Counter("llava_generated_tokens", "Tokens generated for jobs served", ["kind"])
FETCH_FAILURES = Counter(
    "llava_image_fetch_failures", "Jobs whose image URL could not be fetched (by code)", ["code"]
)


def kind_of(task_name: str) -> str:
    """``llava.caption`` -> ``caption``."""
    return task_name.rsplit(".", 1)[-1]


def job_succeeded(task_name: str, result: dict[str, Any]) -> None:
    """Count a served job and observe its timings and tokens (the result's JSON)."""
    kind = kind_of(task_name)
    JOBS.labels(kind, "ok").inc()
    timings = result.get("timings") or {}
    for phase in PHASES:
        value = timings.get(f"{phase}_ms")
        if value is not None:
            PHASE_SECONDS.labels(kind, phase).observe(value / 1000)
    if timings.get("batch_size"):
        BATCH_SIZE.observe(timings["batch_size"])
    PROMPT_TOKENS.labels(kind).inc(result.get("prompt_tokens") or 0)
    GENERATED_TOKENS.labels(kind).inc(result.get("generated_tokens") or 0)


def job_failed(task_name: str, error: LlavaError) -> None:
    """Count a failed job by its code (and an image fetch failure as such)."""
    JOBS.labels(kind_of(task_name), error.code).inc()
    if error.code in FETCH_CODES:
        FETCH_FAILURES.labels(error.code).inc()


def _prime() -> None:
    """Every kind's series exist from the start at 0, so rate() works from the first job."""
    for task_name in TASKS:
        JOBS.labels(kind_of(task_name), "ok")
        PROMPT_TOKENS.labels(kind_of(task_name))
        GENERATED_TOKENS.labels(kind_of(task_name))
    for code in FETCH_CODES:
        FETCH_FAILURES.labels(code)


class HealthCollector:
    """Gauges and counters read from ``Service.health()`` at each scrape."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        try:
            health = self.service.health()
        except Exception:  # a scrape must never fail the worker
            log.exception("metrics: health() failed")
            return
        batching, memory = health.get("batching", {}), health.get("memory", {})
        yield _info(health)
        yield _gauge(
            "llava_model_loaded", "1 once the model is loaded", float(bool(health.get("model_loaded")))
        )
        yield _counter("llava_model_loads", "Model loads by this process", health.get("loads"))
        yield _gauge(
            "llava_jobs_in_flight", "Jobs handed to the model thread, not finished", batching.get("in_flight")
        )
        # Static batcher: batches and their jobs; continuous engine: decode steps, rows, KV tokens.
        yield _counter("llava_batches", "Model calls (batches) run", batching.get("batches_run"))
        yield _counter(
            "llava_batch_rows", "Jobs (rows) run through the model in batches", batching.get("jobs_batched")
        )
        yield _counter("llava_decode_steps", "Decode steps run by the engine", batching.get("steps_run"))
        yield _gauge("llava_running_rows", "Rows in the engine's decode batch", batching.get("running_rows"))
        for key, help_text in (
            ("kv_tokens_budget", "KV cache budget in tokens"),
            ("kv_tokens_reserved", "KV tokens reserved by admitted jobs"),
            ("kv_tokens_used", "KV tokens held by the decode batch"),
            ("prefix_cache_tokens", "KV tokens held by the prefix cache (same image, several jobs)"),
        ):
            yield _gauge(f"llava_{key}", help_text, batching.get(key))
        megabytes = {
            "llava_memory_rss_bytes": ("rss_mb", "Resident memory of the worker process"),
            "llava_cuda_memory_allocated_bytes": ("cuda_allocated_mb", "CUDA memory allocated by tensors"),
            "llava_cuda_memory_reserved_bytes": ("cuda_reserved_mb", "CUDA memory reserved by the allocator"),
            "llava_cuda_memory_total_bytes": ("cuda_total_mb", "Total memory of the GPU"),
        }
        for name, (key, help_text) in megabytes.items():
            value = memory.get(key)
            yield _gauge(name, help_text, None if value is None else value * 1e6)


def _info(health: dict[str, Any]) -> Metric:
    """``llava_worker_info{model, device, dtype, gpu} 1``: what this worker serves, where."""
    keys = ("model", "device", "dtype", "cuda_visible_devices")
    family = GaugeMetricFamily(
        "llava_worker_info", "What this worker serves: model, device, dtype, gpu", labels=[*keys[:3], "gpu"]
    )
    family.add_metric([str(health.get(key) or "") for key in keys], 1.0)
    return family


def _gauge(name: str, help_text: str, value: float | None) -> Metric:
    family = GaugeMetricFamily(name, help_text)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _counter(name: str, help_text: str, value: float | None) -> Metric:
    family = CounterMetricFamily(name, help_text)
    if value is not None:
        family.add_metric([], float(value))
    return family


def serve_metrics(port: int, service: Service, address: str = "127.0.0.1") -> Endpoint:
    """Serve ``/metrics`` (prometheus-client's exposition) on ``address:port`` from an :class:`Endpoint`:
    bounded threads, and idle or slow clients dropped after a few seconds. Raises ``OSError`` if it cannot
    bind."""
    _prime()
    REGISTRY.register(HealthCollector(service))
    endpoint = Endpoint({"/metrics": make_wsgi_app(REGISTRY)}).start(address, port)
    log.info("Prometheus metrics on %s:%d (/metrics)", address, endpoint.port)
    return endpoint
