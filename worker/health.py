"""A worker's health (the ``llava_health`` inspect command and the metrics scrape): the model and its memory,
the queues, jobs done and failed with the last error, the scheduler's state, the preprocessing pool."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from producer.contract import OUTCOME_SETTINGS_KEY
from producer.errors import LlavaError
from worker.runtime import Runtime
from worker.runtime.preprocessing import PreprocessPool
from worker.settings import WorkerSettings, outcome_settings

if TYPE_CHECKING:
    from worker.executor import Executor


@dataclass
class JobStats:
    """Jobs done and failed by this worker, and the last failure (any thread)."""

    jobs_done: int = 0
    jobs_failed: int = 0
    last_error: dict[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def succeeded(self) -> None:
        with self.lock:
            self.jobs_done += 1

    def failed(self, job_id: str, error: LlavaError) -> None:
        with self.lock:
            self.jobs_failed += 1
            self.last_error = {"job_id": job_id, **error.to_dict()}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "jobs_done": self.jobs_done,
                "jobs_failed": self.jobs_failed,
                "last_error": self.last_error,
            }


def health(
    settings: WorkerSettings,
    runtime: Runtime | None,
    executor: Executor | None,
    preprocess: PreprocessPool | None,
    stats: JobStats,
) -> dict[str, Any]:
    """Per-worker health: model loaded, device, loads, memory, jobs done and failed, last error, batching."""
    return {
        "model_loaded": runtime is not None,
        "loads": Runtime.loads,
        "memory": {"rss_mb": _rss_mb(), **(runtime.memory() if runtime else {})},
        "queues": settings.consumed_queues,
        "visibility_timeout": settings.visibility_timeout,
        OUTCOME_SETTINGS_KEY: outcome_settings(settings),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        **(runtime.info() if runtime else {"model": settings.served_model_name}),
        **stats.snapshot(),
        "batching": {"scheduler": settings.scheduler, **(executor.status() if executor else {})},
        "preprocessing": preprocess.status() if preprocess else {"workers": 0},
    }


def _rss_mb() -> float | None:
    """This process's resident memory in MB (Linux), or None."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
