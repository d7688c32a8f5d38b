"""Fault injection, for tests and drills only (settings ``fault_*``, all off by default).

A job is *marked* when its prompt, question or labels contain a marker string. Faults fire on the model
thread, where real ones happen: a simulated out-of-memory (``MemoryError``) for batches above a size or
holding a marked job, a hard crash of the whole process (SIGKILL, as the OOM killer does) when a marked job's
batch runs, and slow decoding steps while a marked job is in the batch.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.settings import WorkerSettings, settings_group


@dataclass(frozen=True)
class Faults:
    """The ``fault_*`` settings of one worker (:meth:`from_settings`: the settings hold their defaults)."""

    oom_above_batch: int | None
    oom_marker: str | None
    crash_marker: str | None
    slow_marker: str | None
    slow_step_s: float

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Faults:
        return settings_group(cls, settings, "fault_")

    def marks(self, text: str) -> frozenset[str]:
        """Which markers ``text`` carries."""
        markers = (self.oom_marker, self.crash_marker, self.slow_marker)
        return frozenset(m for m in markers if m and m in text)

    def before_model_call(self, marks: Sequence[frozenset[str]]) -> None:
        """Crash or raise a simulated out-of-memory for this batch, if configured to."""
        if self.crash_marker and any(self.crash_marker in m for m in marks):
            os.kill(os.getpid(), signal.SIGKILL)
        too_big = self.oom_above_batch is not None and len(marks) > self.oom_above_batch
        if too_big or (self.oom_marker and any(self.oom_marker in m for m in marks)):
            raise MemoryError(f"simulated out of memory for a batch of {len(marks)} (fault injection)")

    def step_hook(self, marks: Sequence[frozenset[str]]) -> Callable[[], None] | None:
        """A per-decoding-step pause while a slow-marked job is in the batch."""
        if not (self.slow_marker and self.slow_step_s and any(self.slow_marker in m for m in marks)):
            return None
        return lambda: time.sleep(self.slow_step_s)
