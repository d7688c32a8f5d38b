"""What a job's outcome shows outside the worker: the result backend (Celery's Redis backend, storing a
job's outcome in one round trip) and the task events Flower shows. A failure is its code and message (the
exception's ``exc_message``, see :mod:`producer.errors`); its traceback (install paths, source lines) stays
in the worker's log, at DEBUG.

Celery's Redis backend reads a task's stored meta before writing it (a stored success is never overwritten:
a job that ran twice keeps its first result), then writes and publishes it: two round trips on every job's
path to its waiting client. Here the rule runs as one Lua script (read, keep a success, else write with
the same expiry and publish), so the waiting client is told one round trip sooner. A redelivered message
(its acknowledgement lost, in a failover say) keeps a stored failure too: the same send must not give its
producer a second, different outcome. A new send under the same id (a resend while the first was queued, a
bulk resume) may still turn a failure into a success. Everything else
(connections, retries, ``result_backend_always_retry``, reading results) is Celery's own.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from celery.worker.request import Request
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import OutOfMemoryError

from producer.sentinel import ReplicaAck, SentinelFailover

log = logging.getLogger(__name__)

_STORE_UNLESS_ENDED = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    if meta['status'] == 'SUCCESS' or (ARGV[3] == '1' and meta['status'] == 'FAILURE') then
      return 0
    end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class ResultBackend(RedisBackend):
    """:class:`celery.backends.redis.RedisBackend` with a one-round-trip ``_store_result``."""

    def _store_result(
        self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        if traceback:
            log.debug("job %s failed:\n%s", bytes_to_str(task_id), traceback)
        meta = self._get_result_meta(result=result, state=state, traceback=None, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        key, value = self.get_key_for_task(task_id), self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:  # as RedisBackend.set checks
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        self.ensure(self._store_unless_ended, (key, value, expires, redelivered(request)))
        return result

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        """Celery retries storing an outcome (``result_backend_always_retry``, with backoff) after a
        connection error; here also after Redis refused it for want of memory: the job ran, and its message
        is acknowledged once the outcome is stored, so a refusal would leave it answered by nothing. A full
        Redis frees memory as workers take jobs and results expire."""
        if isinstance(exc, OutOfMemoryError):
            log.warning("Redis is full and refused a job's outcome: storing it again shortly")
            return True
        return bool(super().exception_safe_to_retry(exc))

    @functools.cached_property
    def _store_script(self) -> Any:
        return self.client.register_script(_STORE_UNLESS_ENDED)

    def _store_unless_ended(self, key: bytes, value: str, expires: Any, keep_failure: bool = False) -> None:
        self._store_script(keys=[key], args=[value, int(expires or 0), int(keep_failure)])


def redelivered(request: Any) -> bool:
    """Whether the task ``request`` came from a message Redis delivered again (kombu marks a restored one)."""
    info = getattr(request, "delivery_info", None)
    return bool(isinstance(info, dict) and info.get("redelivered"))


class SentinelResultBackend(SentinelFailover, ResultBackend, SentinelBackend):
    """:class:`ResultBackend` on Celery's Sentinel backend (the master looked up through the Sentinels),
    each outcome stored and then confirmed by a replica before the job's message is acknowledged: an outcome
    lost with a killed primary would leave its job acknowledged and unanswered."""

    replica_ack = ReplicaAck()

    def _store_unless_ended(self, key: bytes, value: str, expires: Any, keep_failure: bool = False) -> None:
        if not self.replica_ack.wanted():
            super()._store_unless_ended(key, value, expires, keep_failure)
            return
        pipe = self.client.pipeline(transaction=False)  # one connection: WAIT counts its writes only
        self._store_script(keys=[key], args=[value, int(expires or 0), int(keep_failure)], client=pipe)
        pipe.execute_command(*self.replica_ack.command())
        self.replica_ack.record(pipe.execute()[-1])


class TaskRequest(Request):
    """Celery's worker request (a task's ``Request``), its events without the traceback Celery adds to
    ``task-failed`` and ``task-retried``: Flower shows the error's type, message and code (its repr)."""

    def send_event(self, type: str, **fields: Any) -> None:
        fields.pop("traceback", None)
        super().send_event(type, **fields)


# Celery's backend aliases the worker's app overrides (``loader.override_backends``)
BACKENDS = {
    "redis": f"{__name__}:ResultBackend",
    "rediss": f"{__name__}:ResultBackend",
    "sentinel": f"{__name__}:SentinelResultBackend",
}
