"""The continuous engine's model side: :class:`RuntimeSteps` runs :class:`worker.engine.Steps` on a
:class:`Runtime` (a row's prefill, chunk by chunk; one decode step; rows leaving), with the fault injection
of tests, and the prefix cache of images shared by several jobs (``prefix_cache_tokens``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from worker.batching import BatchKey
from worker.faults import Faults
from worker.runtime import Runtime, Sampling
from worker.runtime.decoding import DecodeBatch, GrowingLayer, Pending, Row
from worker.runtime.prefix import PrefixCache


class RuntimeSteps:
    """Engine steps over a runtime. ``payload`` has ``prepared`` and ``marks`` (a
    :class:`worker.executor.Item`); the classify payloads of a step go together to ``classify``
    (:func:`worker.executor.scorer`: one ``Runtime.score_labels`` call, one output or error each)."""

    def __init__(
        self,
        runtime: Runtime,
        faults: Faults,
        classify: Callable[[list[Any]], list[Any]],
        on_rows: Callable[[list[Any], bool], None] = lambda payloads, joined: None,
        prefix_tokens: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.faults = faults
        self._classify = classify
        self._on_rows = on_rows  # told of payloads joining (True) and leaving (False) the decode batch
        self.batch = DecodeBatch()
        self._ids: list[int] = []  # the engine's id of each row of ``batch``, in order
        self._marks: list[frozenset[str]] = []
        self._payloads: list[Any] = []
        self._pending: dict[int, tuple[Pending, frozenset[str], Any]] = {}  # rows still prefilling
        capacity = runtime.settings.prefix_cache_tokens if prefix_tokens is None else prefix_tokens
        self.prefix = PrefixCache(capacity)  # off (0) unless prepared items carry image digests

    def cost(self, key: BatchKey, payload: Any) -> int:
        """KV tokens a job needs: a generating row holds prompt + max_new_tokens (+ the cache's spare
        columns); a classify job holds its prompt once and every label's answer packed after it (no copy
        per label), bounded here by characters (a token is at least one character) plus end tokens."""
        prompt = payload.prepared.prompt_tokens
        if key.scores:
            query = getattr(payload, "query", None)
            question = len(getattr(query, "question", None) or "")
            labels = getattr(payload, "labels", None) or []
            return int(prompt + sum(len(label) + question + 4 for label in labels))
        return prompt + _sampling(key).max_new_tokens + GrowingLayer.SPARE

    def prompt_tokens(self, payload: Any) -> int:
        """Prompt tokens a job's prefill computes (at most: a prefix-cache hit saves some)."""
        return int(payload.prepared.prompt_tokens)

    @property
    def prefix_budget(self) -> int:
        """KV tokens set aside for the prefix cache."""
        return self.prefix.capacity

    @property
    def prefix_tokens(self) -> int:
        return self.prefix.tokens

    def classify(self, payloads: Sequence[Any]) -> list[Any]:
        return self._classify(list(payloads))

    def join(self, row_id: int, key: BatchKey, payload: Any) -> int:
        """A row whose prefill starts (KV reserved); its prompt tokens."""
        marks: frozenset[str] = getattr(payload, "marks", frozenset())
        self._on_rows([payload], True)
        try:
            self.faults.before_model_call([marks])
            pending = self.runtime.begin_row(payload.prepared, _sampling(key))
        except BaseException:
            self._on_rows([payload], False)
            raise
        self._pending[row_id] = (pending, marks, payload)
        return pending.left

    def prefill(self, row_id: int, tokens: int) -> int:
        """Prefill up to ``tokens`` more of a row's prompt; tokens left (0: it joined the decode batch; a
        prefix-cache hit leaves fewer than asked). A failure drops the row (its KV freed) first."""
        pending, marks, payload = self._pending[row_id]
        try:
            done = self.runtime.prefill_chunk(pending, tokens, self.prefix)
        except BaseException:
            del self._pending[row_id]
            self._on_rows([payload], False)
            raise
        if done is None:
            return pending.left
        del self._pending[row_id]
        self.batch.join(*done)
        self._ids.append(row_id)
        self._marks.append(marks)
        self._payloads.append(payload)
        return 0

    def step(self) -> None:
        self.faults.before_model_call(self._marks)
        hook = self.faults.step_hook(self._marks)
        if hook is not None:
            hook()
        self.runtime.decode_step(self.batch)

    def undo_step(self) -> None:
        self.batch.undo_step()

    def ended(self) -> list[int]:
        return [row_id for row_id, row in zip(self._ids, self.batch.rows, strict=True) if row.ended]

    def leave(self, row_ids: Sequence[int]) -> dict[int, Any]:
        """Drop rows (their KV freed now); the answers (or the row's own failure) of those that ended."""
        prefilling = [self._pending.pop(row_id)[2] for row_id in row_ids if row_id in self._pending]
        self._on_rows(prefilling, False)
        gone = set(row_ids) & set(self._ids)
        rows: dict[int, Row] = dict(zip(self._ids, self.batch.rows, strict=True))
        keep = [index for index, row_id in enumerate(self._ids) if row_id not in gone]
        self.batch.keep(keep)
        self._on_rows(
            [p for row_id, p in zip(self._ids, self._payloads, strict=True) if row_id in gone], False
        )
        self._ids = [self._ids[index] for index in keep]
        self._marks = [self._marks[index] for index in keep]
        self._payloads = [self._payloads[index] for index in keep]
        return {row_id: self._answer(rows[row_id]) for row_id in gone if rows[row_id].ended}

    def _answer(self, row: Row) -> Any:
        """An ended row's answer, or its own failure (the engine fails that job alone)."""
        return row.failure if row.failure is not None else self.runtime.finish_row(row)

    @property
    def kv_tokens(self) -> int:
        """Token positions held by running rows, those still prefilling included (not the prefix cache)."""
        prefilling = tuple(self._pending.values())  # read by health from another thread: one snapshot
        return self.batch.kv_tokens + sum(pending.done for pending, _, _ in prefilling)

    def is_out_of_memory(self, error: BaseException) -> bool:
        return self.runtime.is_out_of_memory(error)

    def free_memory(self) -> None:
        self.runtime.free_memory()


def _sampling(key: BatchKey) -> Sampling:
    """A generating job's sampling."""
    assert key.sampling is not None
    return key.sampling
