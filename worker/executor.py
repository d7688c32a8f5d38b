"""The model thread's two executors behind one interface, :class:`Executor` (``run(key, item, timeout) ->
Done``): the static batcher (:class:`StaticExecutor`: :class:`worker.batching.DynamicBatcher` plans the
batches, one model call each, halved and retried when out of memory) and the continuous engine
(:class:`worker.engine.ContinuousEngine` over :class:`worker.steps.RuntimeSteps`). Both tell
:class:`ModelHooks` which jobs are on the model (the delivery ledger counts the deaths of workers mid-call).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from producer.errors import InternalError, ResourceExhausted
from worker.batching import SCORE, Alone, BatchKey, Done, DynamicBatcher
from worker.engine import ContinuousEngine
from worker.faults import Faults
from worker.runtime import Prepared, Runtime
from worker.runtime.scoring import LabelQuery
from worker.settings import WorkerSettings
from worker.steps import RuntimeSteps

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Item:
    """What the model thread gets for one job: its prepared prompt, labels and how to score them (classify),
    fault marks (tests), its deadline (``time.monotonic()``), its id, and whether it must run alone."""

    prepared: Prepared
    labels: list[str] | None = None
    isolated: bool = False  # a suspect redelivery: no batch-mates
    marks: frozenset[str] = frozenset()
    query: LabelQuery | None = None  # how to score the labels (with labels)
    deadline: float = math.inf
    job_id: str = ""


def _nobody(job_ids: list[str]) -> None:
    pass


@dataclass(frozen=True)
class ModelHooks:
    """Told the job ids of each model call as it starts and as it ends (the delivery ledger's attempts, see
    :mod:`worker.delivery`)."""

    started: Callable[[list[str]], None] = _nobody
    ended: Callable[[list[str]], None] = _nobody

    @contextmanager
    def around(self, items: Sequence[Item]) -> Iterator[None]:
        job_ids = [item.job_id for item in items]
        self.started(job_ids)
        try:
            yield
        finally:
            self.ended(job_ids)

    def rows(self, items: Sequence[Item], joined: bool) -> None:
        """The engine's rows joining and leaving the decode batch (one call for all the rows of a step)."""
        if items:
            (self.started if joined else self.ended)([item.job_id for item in items])


class Executor(Protocol):
    """The one model thread, as the service sees it."""

    def run(self, key: BatchKey, item: Item, timeout: float) -> Done: ...  # the output, or the job's error
    def abandon(self, error: BaseException) -> int: ...  # fail every waiting and running job; how many
    def stop(self) -> None: ...
    def status(self) -> dict[str, Any]: ...  # for health


def start_executor(settings: WorkerSettings, runtime: Runtime, faults: Faults, hooks: ModelHooks) -> Executor:
    """The model thread the settings' ``scheduler`` names, started."""
    if settings.scheduler == "static":
        wait = settings.max_batch_wait_ms / 1000
        return StaticExecutor(runtime, faults, hooks, settings.max_batch_size, wait).start()
    steps = RuntimeSteps(runtime, faults, scorer(runtime, faults, hooks), hooks.rows)
    budget, rows = runtime.kv_budget_tokens(), settings.max_running_rows
    return ContinuousEngine(steps, budget, rows, settings.max_prefill_tokens).start()


def scorer(runtime: Runtime, faults: Faults, hooks: ModelHooks) -> Callable[[list[Item]], list[Any]]:
    """The continuous engine's classify: the classify jobs of one step, scored together in one call."""

    def score(items: list[Item]) -> list[Any]:
        with hooks.around(items):
            return call_model(runtime, faults, SCORE, items)

    return score


def call_model(runtime: Runtime, faults: Faults, key: BatchKey, items: Sequence[Item]) -> list[Any]:
    """One model call for ``items`` (all with ``key``): label scoring, or generation with ``key.sampling``;
    one output or error each. Tests' faults fire first."""
    marks = [item.marks for item in items]
    faults.before_model_call(marks)
    deadlines = [item.deadline for item in items]
    if key.sampling is None:  # scoring labels
        queries = [item.query for item in items if item.query is not None]
        if len(queries) != len(items):
            raise InternalError("a classify job reached the model without its label query")
        labels = [item.labels or [] for item in items]
        return runtime.score_labels([i.prepared for i in items], labels, deadlines, queries=queries)
    hook = faults.step_hook(marks)
    return runtime.generate([item.prepared for item in items], key.sampling, deadlines, hook)


class StaticExecutor:
    """The static batcher: :class:`DynamicBatcher` plans the batches on the model thread, :meth:`run_batch`
    runs each one. A suspect redelivery (``item.isolated``) is a batch of its own."""

    def __init__(
        self, runtime: Runtime, faults: Faults, hooks: ModelHooks, max_batch_size: int, max_wait: float
    ) -> None:
        self.runtime, self.faults, self.hooks = runtime, faults, hooks
        self.batcher = DynamicBatcher(self.run_batch, max_batch_size, max_wait)

    def start(self) -> StaticExecutor:
        self.batcher.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()

    def run(self, key: BatchKey, item: Item, timeout: float) -> Done:
        return self.batcher.run(Alone(item.job_id, key) if item.isolated else key, item, timeout)

    def abandon(self, error: BaseException) -> int:
        return self.batcher.abandon(error)

    def status(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.batcher.max_batch_size,
            "batches_run": self.batcher.batches_run,
            "jobs_batched": self.batcher.jobs_run,
            "in_flight": self.batcher.in_flight,
        }

    def run_batch(self, key: Hashable, items: list[Item]) -> list[Any]:
        """One batch (``key``: its :class:`BatchKey`, or an isolated job's :class:`Alone`), the hooks told
        once around it (not once per half)."""
        if isinstance(key, Alone):
            key = key.key
        assert isinstance(key, BatchKey)
        with self.hooks.around(items):
            return self._split_on_oom(key, items)

    def _split_on_oom(self, key: BatchKey, items: list[Item]) -> list[Any]:
        """Out of memory: free the failed attempt's tensors (after leaving the ``except`` block, so nothing of
        it is still referenced), split the batch in halves and retry each; a single job that still does not
        fit fails alone with ``ResourceExhausted``."""
        try:
            return call_model(self.runtime, self.faults, key, items)
        except Exception as exc:
            if not self.runtime.is_out_of_memory(exc):
                raise
            failure = type(exc).__name__
        self.runtime.free_memory()
        if len(items) == 1:
            return [ResourceExhausted(f"out of memory even alone ({failure})")]
        log.warning("out of memory with a batch of %d: splitting it in halves", len(items))
        half = len(items) // 2
        return self._split_on_oom(key, items[:half]) + self._split_on_oom(key, items[half:])
