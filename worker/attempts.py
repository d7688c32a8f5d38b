"""The delivery ledger's model attempts, written off the model thread (see :mod:`worker.delivery`).

The model thread tells :class:`AttemptWriter` that rows join (:meth:`~AttemptWriter.begin`) and leave
(:meth:`~AttemptWriter.end`); one writer thread of its own sends what changed to Redis, each write bounded by
its client's socket timeout, retried with backoff until Redis answers. So a hung or restarting Redis never
stalls the running rows.

Each attempt has a token and is written by one Lua script that is idempotent and order-free: an attempt
marked ``done`` is never counted again, so a write retried after a timeout (Redis may still run the first
one, late) or a ``done`` landing before its ``on`` leaves the count right. Pending writes coalesce per
attempt (an attempt that began and ended before Redis answered writes nothing), and the hand-off is bounded:
once :data:`MAX_PENDING` attempts wait for Redis, a new one is dropped with a warning and its end is not
sent either. Dropping only ever *misses* a crash (that worker may die without the attempt counted: one more
delivery than ``max_deliveries`` at most for it, and the ledger's backstop on deliveries still ends a job
that keeps killing workers); it never counts an innocent job, since an attempt whose begin was accepted
always has its end written.

The crash count needs an attempt's ``on`` in Redis *before* the model runs the row (a row may crash its
worker at once), so :meth:`~AttemptWriter.begin` waits up to :data:`BEGIN_WAIT_S` for it, but only while
Redis answers: once one wait runs out, rows go on without waiting until a write succeeds again.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 1024  # attempts waiting for Redis before new ones are dropped (see the module docstring)
BEGIN_WAIT_S = 0.5  # the model thread's longest wait for an attempt's record, while Redis answers
RETRY_BACKOFF_S = (0.05, 2.0)  # the writer's first and longest pause between failed writes
ON, DONE, UNDELIVER = "on", "done", "undeliver"

# KEYS[1]: a job's ledger hash. ARGV: the attempt's token, ON | DONE | UNDELIVER, the hash's expiry (s).
_WRITE = """
local field = 'attempt:' .. ARGV[1]
local state = redis.call('HGET', KEYS[1], field)
if ARGV[2] == 'on' then
  if not state then
    redis.call('HSET', KEYS[1], field, 'on')
    redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  end
elseif ARGV[2] == 'done' then
  if state == 'on' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
  redis.call('HSET', KEYS[1], field, 'done')
elseif redis.call('HSETNX', KEYS[1], 'undelivered:' .. ARGV[1], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""

_Key = tuple[str, str]  # (job id, token)


class AttemptWriter:
    """The model attempts of this process's jobs, handed to one writer thread (started at the first write)
    that records them in each job's ledger hash (``key(job_id)``) on ``client``."""

    def __init__(self, client: Any, key: Any, expires: int) -> None:
        self._client, self._key, self._expires = client, key, expires
        self._script = client.register_script(_WRITE)
        self._prefix = uuid.uuid4().hex[:12]  # tokens unique across processes and restarts
        self._serial = itertools.count()
        self._lock = threading.Condition()
        self._pending: dict[_Key, str] = {}  # the latest state to write per attempt (ON, DONE, UNDELIVER)
        self._sent: set[str] = set()  # tokens whose ON left for Redis (written, or in doubt after a failure)
        self._open: defaultdict[str, list[str]] = defaultdict(list)  # job id -> its attempts' tokens
        self._queued = self._written = 0  # serials: the last write handed over, the last one stored
        self._answering = True  # the last write succeeded: begin() may wait for its record
        self._writing = False  # a batch is on its way to Redis
        self._thread: threading.Thread | None = None
        self._closed = False

    def begin(self, job_ids: list[str]) -> None:
        """These jobs reach the model (model thread): one attempt each, recorded before they run while Redis
        answers within :data:`BEGIN_WAIT_S`."""
        with self._lock:
            serial = self._queued
            for job_id in job_ids:
                if len(self._pending) >= MAX_PENDING:
                    log.warning("ledger hand-off full: the attempt of job %s is not counted", job_id)
                    continue
                token = f"{self._prefix}-{next(self._serial)}"
                self._open[job_id].append(token)
                serial = self._put((job_id, token), ON)
            if serial > self._written and self._answering:
                self._wait(serial, BEGIN_WAIT_S, "rows reach the model without waiting for it", True)

    def end(self, job_ids: list[str]) -> None:
        """These jobs left the model (model thread): their attempts did not kill the worker. Never waits."""
        with self._lock:
            for job_id in job_ids:
                tokens = self._open.pop(job_id, [])
                if tokens:
                    self._end(job_id, tokens.pop(0))
                if tokens:  # the same id on the model twice (a resend running beside its first run)
                    self._open[job_id] = tokens

    def undeliver(self, job_id: str, wait: float) -> bool:
        """A warm shutdown gives ``job_id`` back (task thread): its attempts here end, its delivery is taken
        back; waits up to ``wait`` seconds for Redis (the job's next delivery must not see them), True once
        recorded."""
        with self._lock:
            for token in self._open.pop(job_id, []):
                self._end(job_id, token)
            serial = self._put((job_id, f"{self._prefix}-{next(self._serial)}"), UNDELIVER)
            return self._wait(serial, wait, "its next delivery may count it once more")

    def close(self, wait: float) -> bool:
        """Write what is pending (up to ``wait`` seconds), then stop the writer. True if all was written."""
        with self._lock:
            if not self._pending and not self._writing:  # a begin and its end dropped together wrote nothing
                self._written = self._queued
            done = self._wait(self._queued, wait, "the attempts of the last jobs may stay counted")
            self._closed = True
            self._lock.notify_all()
            return done

    def _end(self, job_id: str, token: str) -> None:
        if token not in self._sent:  # its ON never left: neither is written
            self._pending.pop((job_id, token), None)
            return
        self._put((job_id, token), DONE)

    def _put(self, key: _Key, state: str) -> int:
        self._pending[key] = state
        self._queued += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self._thread.start()
        self._lock.notify_all()
        return self._queued

    def _wait(self, serial: int, timeout: float, otherwise: str, until_failure: bool = False) -> bool:
        """Wait (holding the lock's condition) until the writes up to ``serial`` are stored; with
        ``until_failure``, no longer than until a write fails (the model thread: no use waiting on a Redis
        that is away)."""
        answering = self._answering
        self._lock.wait_for(
            lambda: self._written >= serial or (until_failure and not self._answering), timeout
        )
        if self._written >= serial:
            return True
        if answering:
            log.warning("Redis did not record a ledger write within %g s: %s", timeout, otherwise)
        self._answering = False
        return False

    def _run(self) -> None:
        pause = RETRY_BACKOFF_S[0]
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._pending) or self._closed)
                if self._closed and not self._pending:
                    return
                batch, serial = dict(self._pending), self._queued
                self._pending.clear()
                self._writing = True
                self._sent.update(token for (_, token), state in batch.items() if state == ON)
            if self._write(batch, first_try=pause == RETRY_BACKOFF_S[0]):
                pause = RETRY_BACKOFF_S[0]
                with self._lock:
                    self._written, self._answering, self._writing = serial, True, False
                    self._sent.difference_update(token for (_, token), state in batch.items() if state != ON)
                    self._lock.notify_all()
                continue
            with self._lock:  # in doubt: written again (idempotent) unless a later state replaced it
                self._pending = {**batch, **self._pending}
                self._answering = self._writing = False  # Redis failed: waits for records end at once
                self._lock.notify_all()
                if self._closed:
                    return
            time.sleep(pause)
            pause = min(pause * 2, RETRY_BACKOFF_S[1])

    def _write(self, batch: dict[_Key, str], first_try: bool) -> bool:
        try:
            pipe = self._client.pipeline(transaction=False)
            for (job_id, token), state in batch.items():
                self._script(keys=[self._key(job_id)], args=[token, state, self._expires], client=pipe)
            pipe.execute()
        except Exception as exc:  # Redis away, hung or full: the writes wait for it (bounded, see above)
            (log.warning if first_try else log.debug)("ledger writes wait for Redis (retrying): %s", exc)
            return False
        if not first_try:
            log.warning("Redis answers again: %d pending ledger write(s) recorded", len(batch))
        return True
