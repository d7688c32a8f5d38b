"""The worker process's model side, started and stopped in one place: the model (loaded once per process), the
preprocessing pool (``preprocess_workers``) and the one model thread (the executor the settings'
``scheduler`` names, see :mod:`worker.executor`); a job's two steps that need them (prepare, run) and
their health."""

from __future__ import annotations

import functools
from typing import Any

from producer.errors import InternalError
from worker.batching import BatchKey, Done
from worker.executor import Executor, Item, ModelHooks, start_executor
from worker.faults import Faults
from worker.health import JobStats, health
from worker.runtime import Prepared, Prompt, Runtime
from worker.runtime.preprocessing import PreprocessPool, default_workers
from worker.settings import WorkerSettings

PREPROCESS_START_S = 120.0  # seconds for the preprocessing pool's processes to start and load the processor


class ModelHost:
    """Loads the model and starts the preprocessing pool and the model thread (:meth:`start`, once), serves
    :meth:`prepare` and :meth:`run` with them, stops them (:meth:`stop`)."""

    def __init__(self, settings: WorkerSettings, faults: Faults, hooks: ModelHooks) -> None:
        self.settings, self.faults, self.hooks = settings, faults, hooks
        self.runtime: Runtime | None = None
        self.executor: Executor | None = None
        self.preprocess: PreprocessPool | None = None  # the processor's processes (preprocess_workers)

    def start(self) -> Runtime:
        """Load the model (once per process), start the preprocessing pool and the model thread."""
        if self.runtime is None:
            runtime = Runtime(self.settings)
            workers = self.settings.preprocess_workers
            workers = default_workers() if workers is None else workers
            try:
                if workers:
                    self.preprocess = PreprocessPool(runtime.processor, workers).start(PREPROCESS_START_S)
                self.executor = start_executor(self.settings, runtime, self.faults, self.hooks)
            except BaseException:  # nothing half-started stays behind (the pool's processes)
                self.stop()
                self.preprocess = self.executor = None
                raise
            self.runtime = runtime
        return self.runtime

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.stop()
        if self.preprocess is not None:
            self.preprocess.stop()

    def abandon(self, error: BaseException) -> int:
        """End of a warm shutdown's grace: jobs waiting on the preprocessing pool fail (``PoolStopped``);
        those waiting for or on the model get ``error``. Returns how many of the latter."""
        if self.preprocess is not None:
            self.preprocess.abort()
        return 0 if self.executor is None else self.executor.abandon(error)

    def loaded(self) -> Runtime:
        if self.runtime is None:
            raise InternalError("the model is not loaded (Service.start() was not called)")
        return self.runtime

    def prepare(self, prompt: Prompt, reserve: int, deadline: float) -> Prepared:
        """The processor's work, in this thread or in the preprocessing pool (waiting until ``deadline``;
        ``PoolStopped`` once the pool stopped)."""
        runtime = self.loaded()
        if self.preprocess is None:
            return runtime.prepare(prompt, reserve=reserve)
        return runtime.prepare(prompt, reserve, functools.partial(self.preprocess, deadline=deadline))

    def run(self, key: BatchKey, item: Item, timeout: float) -> Done:
        """The job on the model thread: its output, its error, or ``JobTimeout`` after ``timeout``."""
        if self.executor is None:
            raise InternalError("the model is not loaded (Service.start() was not called)")
        return self.executor.run(key, item, timeout)

    def health(self, stats: JobStats) -> dict[str, Any]:
        """Per-worker health (see :func:`worker.health.health`)."""
        return health(self.settings, self.runtime, self.executor, self.preprocess, stats)
