"""Continuous batching: every step admits waiting jobs within the KV budget, then decodes ONE token for
every running row; a row leaves the moment it ends and its KV memory is free for the next admission.

The rules are one pure function, :func:`worker.scheduler.schedule` (no clocks, no locks, unit-tested without
sleeps; the KV budget is explained there); the thread in :class:`ContinuousEngine` executes its decisions
through a :class:`Steps` object (for the real model, :class:`worker.steps.RuntimeSteps` over
:mod:`worker.runtime.decoding`).

Design choice (measured on CPU, fp32, tiny real-geometry checkpoint; numbers in the README, Performance):
an in-house step loop over a left-padded ``DynamicCache``. Each new row is prefilled alone (no padding, so
attention keeps its fast causal path) and concatenated into the running batch; finished rows are dropped by
index and all-padding columns are cut. transformers' own continuous batching (``generate_batch`` /
``ContinuousBatchingManager``, paged KV) takes token ids only: LLaVA's image features would have to enter
through the input embedding (placeholder ids keyed per request), which its model runner does not offer for
``LlavaNextForConditionalGeneration``; it has no per-request deadline, and classify (prefill + label
scoring) would still run outside its loop. Measured here with the same small LM, text only (16 prompts of
1.2k-2.9k tokens, 48 new tokens, CPU, 1 thread): this step loop 8.3-9.6 s, ``generate_batch`` 144 s (cause not
profiled; its paged attention is built for GPUs); not measured on a GPU. The in-house loop gives per-row
sampling, deadlines, cancellation, isolation of suspect jobs and classify between decode steps,
token-identical to one-by-one ``generate`` (tested). Decode steps write into spare cache columns
(:class:`worker.runtime.decoding.GrowingLayer`) rather than concatenating the cache every step (8 rows x
~2.5k tokens: ~17.5 -> ~8-11 ms a step on CPU). In the serving scenario (bench/serving.py) it served 1.28x
the static batcher's jobs/s on a quiet run of this 2-core CPU (2.12x under heavy load), 4 forward passes
per job instead of 30.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from producer.errors import InternalError, JobTimeout, LlavaError, ResourceExhausted
from worker.batching import BatchKey, Done, ModelThread, _settle
from worker.scheduler import Step, Ticket, footprint, schedule

log = logging.getLogger(__name__)


class Steps(Protocol):
    """What the engine needs of the model (one thread calls it). Row ids are the engine's."""

    def cost(self, key: BatchKey, payload: Any) -> int: ...
    def prompt_tokens(self, payload: Any) -> int: ...
    def classify(self, payloads: Sequence[Any]) -> list[Any]: ...
    def join(self, row_id: int, key: BatchKey, payload: Any) -> int: ...  # prompt tokens left to prefill
    def prefill(self, row_id: int, tokens: int) -> int: ...  # tokens left; 0: the row decodes
    def step(self) -> None: ...
    def ended(self) -> list[int]: ...
    def leave(self, row_ids: Sequence[int]) -> dict[int, Any]: ...
    def undo_step(self) -> None: ...
    @property
    def kv_tokens(self) -> int: ...
    @property
    def prefix_budget(self) -> int: ...  # KV tokens set aside for the prefix cache
    @property
    def prefix_tokens(self) -> int: ...  # held there now
    def is_out_of_memory(self, error: BaseException) -> bool: ...
    def free_memory(self) -> None: ...


@dataclass(eq=False)
class _Job:
    ticket: Ticket
    key: BatchKey
    payload: Any
    enqueued: float
    future: Future = field(default_factory=Future)
    started: float | None = None
    peak_rows: int = 0
    prefill_left: int = 0  # prompt tokens still to prefill once running

    @property
    def decoding(self) -> bool:
        return self.prefill_left == 0


class ContinuousEngine(ModelThread[BatchKey]):
    """Runs jobs on one model thread, step by step as :func:`schedule` decides. One of the two executors of
    :mod:`worker.executor` (``run``/``abandon``/``stop``/``status``), beside the static batcher."""

    def __init__(
        self,
        steps: Steps,
        budget: int,
        max_rows: int,
        prefill_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(clock)
        self._steps = steps
        if steps.prefix_budget >= budget:
            raise ValueError(f"prefix_cache_tokens ({steps.prefix_budget}) leaves none of {budget} KV tokens")
        self.budget = budget - steps.prefix_budget  # the prefix cache's share is set aside
        self.max_rows = max_rows
        self.prefill_tokens = prefill_tokens
        self._ids = itertools.count()
        self._waiting: list[_Job] = []
        self._running: dict[int, _Job] = {}
        self.steps_run = 0
        self.jobs_run = 0

    def submit(self, key: BatchKey, payload: Any, timeout: float) -> Future:
        """Queue a job (``key``: scoring or generating with its sampling); the future holds its
        output or its error. ``payload.isolated`` (if set) makes it run with no other row in flight. A
        cancelled future (``run`` past its deadline) makes its row leave at the next step."""
        now = self._clock()
        ticket = Ticket(
            next(self._ids),
            self._steps.cost(key, payload),
            now + timeout,
            classify=key.scores,
            isolated=bool(getattr(payload, "isolated", False)),
            prefill=self._steps.prompt_tokens(payload),
        )
        job = _Job(ticket, key, payload, now, prefill_left=ticket.prefill)
        self._enqueue(job)
        return job.future

    def _queue(self) -> list[Any]:
        return self._waiting

    def _all_jobs(self) -> list[Any]:
        jobs = self._waiting + list(self._running.values())
        self._waiting = []
        return jobs

    @property
    def steps(self) -> Steps:
        """What runs the model's steps."""
        return self._steps

    def status(self) -> dict[str, Any]:
        """Jobs run and in flight; KV tokens budgeted (for rows), reserved, held now and free; the prefix
        cache's share and what it holds; running rows (prefilling ones included); steps run."""
        with self._cond:
            reserved = footprint([job.ticket.tokens for job in self._running.values()])
            rows = len(self._running)
            prefilling = sum(not job.decoding for job in self._running.values())
            in_flight = len(self._waiting) + rows
        return {
            "jobs_batched": self.jobs_run,
            "in_flight": in_flight,
            "kv_tokens_budget": self.budget,
            "kv_tokens_reserved": reserved,
            "kv_tokens_used": self._steps.kv_tokens,
            "kv_tokens_free": self.budget - reserved,
            "prefix_cache_tokens_budget": self._steps.prefix_budget,
            "prefix_cache_tokens": self._steps.prefix_tokens,
            "running_rows": rows,
            "prefilling_rows": prefilling,
            "steps_run": self.steps_run,
        }

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    self._fail_all(InternalError("the worker is shutting down"))
                    return
                self._drop_cancelled()
                step = self._plan()
                if step.idle:
                    self._cond.wait()
                    continue
            self._execute(step)

    def _plan(self) -> Step:
        running = [replace(job.ticket, prefill=job.prefill_left) for job in self._running.values()]
        waiting = [job.ticket for job in self._waiting]
        return schedule(waiting, running, self._clock(), self.budget, self.max_rows, self.prefill_tokens)

    def _take(self, ids: Sequence[int]) -> list[_Job]:
        wanted = set(ids)
        with self._cond:
            taken = [job for job in self._waiting if job.ticket.id in wanted]
            self._waiting = [job for job in self._waiting if job.ticket.id not in wanted]
        return taken

    def _execute(self, step: Step) -> None:
        for job in self._take(step.expired):
            _settle(job, error=JobTimeout("the job waited past its deadline for the model (job_timeout)"))
        for job in self._take(step.too_big):
            _settle(job, error=ResourceExhausted(_too_big(job.ticket.tokens, self.budget)))
        if step.timed_out:
            late = JobTimeout("the job's generation ran past its deadline (job_timeout)")
            self._leave(step.timed_out, late)
        if step.classify:
            self._classify(self._take(step.classify))
        for job in self._take(step.admit):
            self._admit(job)
        for row_id, tokens in step.chunks:
            self._prefill(row_id, tokens)
        if step.decode and any(job.decoding for job in self._running.values()):
            self._decode()

    def _classify(self, jobs: list[_Job]) -> None:
        """Score the step's classify jobs together (one output or error each). If that fails as a whole
        (out of memory, a model error), its memory is freed first, then each job runs again alone."""
        started = self._clock()
        outputs: list[Any] = []

        def score() -> None:
            outputs.extend(self._steps.classify([job.payload for job in jobs]))
            if len(outputs) != len(jobs):
                raise InternalError(f"classify returned {len(outputs)} outputs for {len(jobs)} jobs")

        failure = self._guarded(score)
        if failure is not None and len(jobs) > 1:
            log.warning("classify of %d jobs together failed (%s): each again alone", len(jobs), failure)
            for job in jobs:
                self._classify([job])
            return
        for job, output in zip(jobs, outputs if failure is None else [failure], strict=True):
            if isinstance(output, BaseException):
                _settle(job, error=output)
            else:
                self.jobs_run += 1  # before the result is handed over: whoever has it sees it counted
                _settle(job, result=Done(output, len(self._running) + len(jobs), started - job.enqueued))

    def _admit(self, job: _Job) -> None:
        job.started = self._clock()
        with self._cond:
            self._running[job.ticket.id] = job
        left: list[int] = []
        failure = self._guarded(lambda: left.append(self._steps.join(job.ticket.id, job.key, job.payload)))
        if failure is None:
            job.prefill_left = left[0]
            return
        self._failed_prefill(job, failure)

    def _prefill(self, row_id: int, tokens: int) -> None:
        job = self._running.get(row_id)
        if job is None or job.decoding:
            return  # it left this step
        left: list[int] = []
        failure = self._guarded(lambda: left.append(self._steps.prefill(row_id, tokens)))
        if failure is not None:
            self._failed_prefill(job, failure)
            return
        job.prefill_left = left[0]  # a prefix-cache hit at its first chunk leaves less than asked
        if job.decoding:
            self._finish_ended()  # its first token may end it

    def _failed_prefill(self, job: _Job, failure: LlavaError) -> None:
        """The steps already dropped the row; it retries alone after an out-of-memory beside others."""
        with self._cond:
            del self._running[job.ticket.id]
        if isinstance(failure, ResourceExhausted) and self._running and not job.ticket.isolated:
            self._requeue_isolated(job)  # out of memory beside others: retry alone once they are done
        else:
            _settle(job, error=failure)

    def _decode(self) -> None:
        failure = self._guarded(self._steps.step)
        if failure is None:
            self.steps_run += 1
            decoding = [job for job in self._running.values() if job.decoding]
            for job in decoding:
                job.peak_rows = max(job.peak_rows, len(decoding))
            self._finish_ended()
            return
        if isinstance(failure, ResourceExhausted):
            self._steps.undo_step()
            decoding = [job for job in self._running.values() if job.decoding]
            youngest = max(decoding, key=lambda job: job.started or 0.0)
            self._steps.leave([youngest.ticket.id])
            with self._cond:
                del self._running[youngest.ticket.id]
            if self._running and not youngest.ticket.isolated:
                self._requeue_isolated(youngest)
            else:
                _settle(youngest, error=failure)
            return
        self._leave(list(self._running), failure)

    def _guarded(self, action: Callable[[], Any]) -> LlavaError | None:
        """Run ``action``; an out-of-memory or other failure comes back as a coded error, AFTER the except
        block is left and memory is freed, so a retry never runs beside the failed attempt's tensors."""
        try:
            action()
            return None
        except LlavaError as exc:
            return exc
        except Exception as exc:
            if self._steps.is_out_of_memory(exc):
                failure: LlavaError = ResourceExhausted(f"out of memory ({type(exc).__name__})")
            else:
                log.exception("model step failed")
                failure = InternalError(f"{type(exc).__name__}: {exc}")
        gc.collect()
        self._steps.free_memory()
        return failure

    def _finish_ended(self) -> None:
        ended = self._steps.ended()
        if ended:
            self._leave(ended, None)

    def _leave(self, row_ids: Sequence[int], error: LlavaError | None) -> None:
        outputs = self._steps.leave(row_ids)
        now = self._clock()
        with self._cond:
            jobs = [self._running.pop(row_id) for row_id in row_ids if row_id in self._running]
        for job in jobs:
            output = error if error is not None else outputs[job.ticket.id]
            if isinstance(output, BaseException):
                _settle(job, error=output)
            else:
                waited = (job.started or now) - job.enqueued
                self.jobs_run += 1  # before the result is handed over: whoever has it sees it counted
                _settle(job, result=Done(output, max(job.peak_rows, 1), waited))

    def _requeue_isolated(self, job: _Job) -> None:
        log.warning("out of memory beside %d rows: a job runs again alone", len(self._running))
        ticket = replace(job.ticket, isolated=True)
        retry = _Job(ticket, job.key, job.payload, job.enqueued, job.future, prefill_left=ticket.prefill)
        with self._cond:
            self._waiting.insert(0, retry)

    def _drop_cancelled(self) -> None:
        """Jobs whose future is already settled (cancelled, abandoned) leave; their rows' KV is freed."""
        self._waiting = [job for job in self._waiting if not job.future.done()]
        gone = [row_id for row_id, job in self._running.items() if job.future.done()]
        if gone:
            self._steps.leave(gone)
            for row_id in gone:
                del self._running[row_id]

    def _fail_all(self, error: LlavaError) -> None:
        for job in [*self._waiting, *self._running.values()]:
            _settle(job, error=error)
        self._waiting.clear()
        self._running.clear()


def _too_big(tokens: int, budget: int) -> str:
    return f"the job needs {tokens} KV cache tokens, over this worker's budget of {budget} (kv_cache_tokens)"
