"""The continuous engine's rules, one pure function: :func:`schedule` decides the next :class:`Step` from the
waiting jobs and running rows (:class:`Ticket`: KV tokens, deadline, kind). No clocks, no locks, unit-tested
without sleeps; :class:`worker.engine.ContinuousEngine` executes its decisions.

KV budget: a left-padded cache holds ``rows x width`` positions, and a row's length never passes its prompt
plus its ``max_new_tokens``; so admission reserves ``rows x max(prompt + max_new_tokens)`` (the padded
footprint), never over-committing. A paged cache would not pay for the padding; that is left for later.
A long prompt is prefilled in chunks (at most ``prefill_tokens`` a step, decode steps between them); its
row holds its whole reservation from admission. The steps' prefix cache (same image, several jobs) has
its own share, set aside from the budget by the engine.
The classify jobs of a step are scored together in one forward pass over their merged, left-padded
caches, so they are budgeted together too (:func:`classify_footprint`), beside the running rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Ticket:
    """A job as the scheduler sees it: KV tokens it needs, its deadline, its kind, whether it runs alone."""

    id: int
    tokens: int  # generate: prompt + max_new_tokens (held while running); classify: its peak (transient)
    deadline: float
    classify: bool = False
    isolated: bool = False
    prefill: int = 0  # prompt tokens still to prefill (a running row's > 0: it is prefilled in chunks)


@dataclass(frozen=True)
class Step:
    """What the engine does now, in this order: fail ``expired``/``timed_out``/``too_big``, score
    ``classify``, start ``admit`` (KV reserved), prefill ``chunks`` (row id, tokens; a row whose prompt
    is done joins the decode batch), then one decode step if ``decode``."""

    expired: list[int] = field(default_factory=list)  # waiting jobs past their deadline
    timed_out: list[int] = field(default_factory=list)  # running rows past their deadline
    too_big: list[int] = field(default_factory=list)  # jobs that would not fit even alone
    classify: list[int] = field(default_factory=list)
    admit: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)
    decode: bool = False

    @property
    def idle(self) -> bool:
        """Nothing to do until a job arrives."""
        failing = self.expired or self.timed_out or self.too_big
        return not (failing or self.classify or self.admit or self.chunks or self.decode)


def footprint(tokens: Sequence[int]) -> int:
    """KV positions a left-padded batch of rows reserving ``tokens`` may reach: rows x the widest."""
    return len(tokens) * max(tokens, default=0)


def classify_footprint(jobs: Sequence[Ticket]) -> int:
    """KV positions classify jobs scored together may reach: each image's prompt (``prefill``) left-padded to
    the longest, then its labels' tokens (``tokens - prefill``) padded to the most: rows x (widest prompt +
    widest labels), at least the sum of their peaks."""
    if not jobs:
        return 0
    prompt = max(job.prefill for job in jobs)
    return len(jobs) * (prompt + max(job.tokens - job.prefill for job in jobs))


def schedule(
    waiting: Sequence[Ticket],
    running: Sequence[Ticket],
    now: float,
    budget: int,
    max_rows: int,
    prefill_tokens: int | None = None,
) -> Step:
    """The next step for ``waiting`` jobs (arrival order) and ``running`` rows. Pure: no clocks, no locks.

    A step prefills at most ``prefill_tokens`` prompt tokens (a step of big prefills would stall the
    running rows and any classify job behind them): rows already prefilling go on first, oldest first, then
    new jobs take the rest, a long prompt in chunks over several steps (its KV reserved from its first).
    Generate jobs join in arrival order while ``footprint`` stays within ``budget``, rows within
    ``max_rows`` and prefill tokens are left this step; the first that does not fit stops later generate
    jobs (no starvation), but a classify job behind it runs if the transient peak of the step's classify
    jobs, scored together (:func:`classify_footprint`), still fits beside the rows. An isolated job waits
    until no row runs, then runs alone; nothing is admitted beside it or behind it meanwhile.
    """
    timed_out = [row.id for row in running if row.deadline <= now]
    rows = [row for row in running if row.deadline > now]
    expired = [job.id for job in waiting if job.deadline <= now]
    too_big = [job.id for job in waiting if job.deadline > now and job.tokens > budget]
    live = [job for job in waiting if job.deadline > now and job.tokens <= budget]
    step = Step(expired=expired, timed_out=timed_out, too_big=too_big)
    prefill_left = prefill_tokens if prefill_tokens is not None else sum(j.prefill for j in [*rows, *live])
    for row in rows:
        if row.prefill and prefill_left:
            prefill_left = _chunk(step, row, prefill_left)
    if any(row.isolated for row in rows):
        return _with(step, decode=_decoding(step, rows))
    _take_waiting(step, live, [row.tokens for row in rows], budget, max_rows, prefill_left)
    admitted = [job for job in live if job.id in step.admit]
    return _with(step, decode=_decoding(step, [*rows, *admitted]))


def _take_waiting(
    step: Step, live: Sequence[Ticket], held: list[int], budget: int, max_rows: int, prefill_left: int
) -> None:
    """Add to ``step`` the waiting jobs that run now (classify) or join (admit), as :func:`schedule` says;
    ``held``: the running rows' reservations."""
    scored: list[Ticket] = []  # the step's classify jobs
    blocked = False
    for job in live:
        if job.isolated:
            if not held and not step.classify and not step.admit:
                (step.classify if job.classify else step.admit).append(job.id)
            break
        if job.classify:
            if footprint(held) + classify_footprint([*scored, job]) <= budget:
                scored.append(job)
                step.classify.append(job.id)
        elif not blocked and _fits(job, held, budget, max_rows, prefill_left):
            held.append(job.tokens)
            step.admit.append(job.id)
            if job.prefill:
                prefill_left = _chunk(step, job, prefill_left)
        else:
            blocked = True


def _chunk(step: Step, ticket: Ticket, prefill_left: int) -> int:
    """Prefill as much of ``ticket``'s prompt as this step has left; the prefill tokens left after it."""
    step.chunks.append((ticket.id, min(ticket.prefill, prefill_left)))
    return prefill_left - step.chunks[-1][1]


def _fits(job: Ticket, held: list[int], budget: int, max_rows: int, prefill_left: int) -> bool:
    room = len(held) < max_rows and footprint([*held, job.tokens]) <= budget
    return room and (prefill_left > 0 or not job.prefill)


def _decoding(step: Step, rows: Sequence[Ticket]) -> bool:
    """Whether any row decodes after this step's prefills (its prompt done before or by its chunk)."""
    chunks = dict(step.chunks)
    return any(row.prefill == chunks.get(row.id, 0) for row in rows)


def _with(step: Step, **changes: Any) -> Step:
    return Step(**{**step.__dict__, **changes})
