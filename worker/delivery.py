"""Delivery concerns of the worker, apart from the tasks: the redelivery ledger, messages that cannot be
decoded, and the one-visibility-timeout-per-broker rule.

With ``acks_late``, a job whose worker dies is delivered again; one that kills every worker would loop
forever, and, batched with others, would take its batch-mates down with it each time. The ledger counts, per
job, how often its worker died while it was on the model (``attempts``: the model thread adds one when the
job's batch starts and takes it back when the batch returns, so only a death mid-call leaves it counted). A
job delivered again after such a death is *suspect*: it runs isolated (no batch-mates). A job whose worker
died on the model ``max_deliveries`` times ends ``WorkerLost`` without running again. Jobs that were only
waiting in a dying worker, or done with the model, are not counted against, so innocent jobs never reach the
cap; a backstop on plain deliveries still ends a job that kills workers before the model.

Redis is never waited on by the model thread: the attempts leave it through :class:`worker.attempts.
AttemptWriter`. Every ledger call has its own bounded socket timeouts, and a Redis error on a job's arrival
never becomes the job's outcome: :meth:`DeliveryLedger.arrived` retries it with backoff while holding the
job, then raises :class:`LedgerUnavailable` (the task hands the job back to the queue).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery, current_task, states
from celery.worker.consumer import Consumer
from redis.exceptions import RedisError

from producer.app import backend_client, outcome_differences, worker_health
from producer.blobs import RedisBlobStore, message_claim
from producer.contract import CLAIM_HEADER, OUTCOME_SETTINGS_KEY, TASKS, is_blob_reference
from producer.errors import InvalidRequest, WorkerLost
from worker.attempts import AttemptWriter
from worker.settings import WorkerSettings, outcome_settings

log = logging.getLogger(__name__)

# KEYS: the job's ledger hash, its stored result; ARGV: the arrival's token, the ledger's expiry. An arrival
# counts once (HSETNX on its token), whichever of its tries Redis runs.
_COUNT_ARRIVAL = """
if redis.call('HSETNX', KEYS[1], 'arrival:' .. ARGV[1], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {redis.call('GET', KEYS[2]), redis.call('HGET', KEYS[1], 'deliveries'),
        redis.call('HGET', KEYS[1], 'attempts')}
"""
BACKSTOP_FACTOR = 3  # deliveries allowed per counted model attempt before a job is given up regardless
REDIS_TIMEOUT = 5.0  # seconds per ledger operation on Redis (connect, each read)
ARRIVAL_BACKOFF_S = (0.2, 5.0)  # first and longest pause between a held job's tries of its arrival


class LedgerUnavailable(Exception):
    """Redis did not take a job's arrival in the ledger for as long as the job may be held: hand it back."""


@dataclass(frozen=True)
class Delivery:
    """What the ledger knows when a job arrives: this delivery's number, earlier model attempts, and the
    job's stored result if it already succeeded, or its stored error if it already failed."""

    deliveries: int
    attempts: int
    succeeded: Any | None = None
    failed: BaseException | None = None

    @property
    def suspect(self) -> bool:
        """It was on the model when a worker died: run it alone."""
        return self.attempts > 0


class DeliveryLedger:
    """Per-job counters in the result backend's Redis (one small hash per job, expiring with results), the
    stored result of a job that already succeeded (a redelivered success is returned, not re-run), and the
    blob store of images sent by reference (a job's claim is released when it ends)."""

    def __init__(self, app: Celery, settings: WorkerSettings) -> None:
        self.backend = app.backend
        self.max_deliveries = settings.max_deliveries
        self.expires = settings.result_expires
        # the ledger's own client, bounded (Celery's backend client waits up to two minutes per read)
        redis_backend = getattr(self.backend, "client", None) is not None  # a redis.Redis behind it
        self.client = _bounded_client(self.backend) if redis_backend else None
        self.blobs = None if self.client is None else _blob_store(self.backend, settings)
        self.attempts = None if self.client is None else AttemptWriter(self.client, self.key, self.expires)
        self.stopping = threading.Event()  # a warm shutdown began: held jobs go back at once
        if self.client is None:
            log.warning(
                "result backend %s has no Redis client: the redelivery cap and blob images are off",
                type(self.backend),
            )

    @staticmethod
    def key(job_id: str) -> str:
        return f"llava-ledger-{job_id}"

    @functools.cached_property
    def _arrival_script(self) -> Any:
        assert self.client is not None
        return self.client.register_script(_COUNT_ARRIVAL)

    def arrived(self, job_id: str, patience: float) -> Delivery:
        """:meth:`delivered`, a Redis error retried with backoff for up to ``patience`` seconds (the job held
        meanwhile, until :attr:`stopping` at most); then :class:`LedgerUnavailable`. The tries share one
        arrival token, so a try that timed out and ran late in Redis (a hung primary runs what it was sent
        when it wakes) counts no second delivery."""
        deadline, pause = time.monotonic() + patience, ARRIVAL_BACKOFF_S[0]
        arrival = uuid.uuid4().hex
        while True:
            try:
                return self.delivered(job_id, arrival)
            except RedisError as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopping.is_set():
                    raise LedgerUnavailable(f"Redis did not take the job's arrival: {exc}") from None
                log.warning("job %s held: Redis did not take its arrival (%s), retrying", job_id, exc)
            self.stopping.wait(min(pause, left))
            pause = min(2 * pause, ARRIVAL_BACKOFF_S[1])

    def delivered(self, job_id: str, arrival: str | None = None) -> Delivery:
        """Count the delivery ``arrival`` (a token; once however often it is sent) of ``job_id`` and read its
        stored outcome, in one round trip (zeros and the backend's answer when counting is off)."""
        if self.client is None:
            return Delivery(0, 0, *self._ended(self.backend.get_task_meta(job_id)))
        keys = [self.key(job_id), self.backend.get_key_for_task(job_id)]
        args = [arrival or uuid.uuid4().hex, self.expires]
        meta, deliveries, attempts = self._arrival_script(keys=keys, args=args)
        stored = self._ended(self.backend.decode_result(meta)) if meta else (None, None)
        return Delivery(int(deliveries), int(attempts or 0), *stored)

    def _ended(self, meta: dict[str, Any]) -> tuple[Any | None, BaseException | None]:
        """(result, None) for a stored success, (None, its error) for a stored failure, else (None, None)."""
        if meta.get("status") == states.SUCCESS:
            return meta.get("result"), None
        if meta.get("status") == states.FAILURE:
            return None, self.backend.exception_to_python(meta.get("result"))
        return None, None

    def verdict(self, delivery: Delivery) -> WorkerLost | None:
        """The error ending a job that killed its workers too often, or None to run it."""
        if delivery.attempts >= self.max_deliveries:
            return WorkerLost(
                f"the job's worker died {delivery.attempts} times while it was on the model "
                f"(max_deliveries {self.max_deliveries}); it is not retried again"
            )
        if delivery.deliveries > BACKSTOP_FACTOR * self.max_deliveries:
            return WorkerLost(
                f"the job was delivered {delivery.deliveries} times and its worker died each time "
                f"(max_deliveries {self.max_deliveries} x {BACKSTOP_FACTOR}); it is not retried again"
            )
        return None

    def model_started(self, job_ids: list[str]) -> None:
        """The model thread is about to run these jobs: one attempt each until :meth:`model_finished`
        (recorded off the model thread, see :mod:`worker.attempts`)."""
        if self.attempts is not None and job_ids:
            self.attempts.begin(job_ids)

    def model_finished(self, job_ids: list[str]) -> None:
        """The model call returned (outputs or errors): the attempt did not kill the worker."""
        if self.attempts is not None and job_ids:
            self.attempts.end(job_ids)

    def undeliver(self, job_id: str) -> None:
        """A warm shutdown hands ``job_id`` back, not the job's fault: its delivery is taken back, and so is
        its attempt if it is still on the model (the process may exit before the model thread lets it go).
        Waits up to :data:`REDIS_TIMEOUT` for Redis, never raises."""
        if self.attempts is not None:
            self.attempts.undeliver(job_id, REDIS_TIMEOUT)

    def close(self) -> None:
        """The worker stops: write the pending attempts (up to :data:`REDIS_TIMEOUT`)."""
        if self.attempts is not None:
            self.attempts.close(REDIS_TIMEOUT)

    def release_blob(self, request: Any, job_id: str) -> None:
        """``job_id`` ended: release its claim on the blob its request names, if any (never raises)."""
        image = request.get("image") if isinstance(request, dict) else None
        if self.blobs is None or not isinstance(image, str) or not is_blob_reference(image):
            return
        try:
            # The claim is the send's (its message header), so a resend under job_id keeps the image; the
            # task's after_return calls this with the job's request still current.
            task = current_task.request if current_task else None
            token = getattr(task, CLAIM_HEADER, None) if task is not None and task.id == job_id else None
            self.blobs.release(image, message_claim(token, job_id))
        except Exception as exc:  # the blob's TTL removes it later
            log.warning("could not release the blob of job %s: %s", job_id, exc)


BLOB_READ_TIMEOUT = 5.0  # seconds per Redis operation on a blob: a hung store is a retryable fetch_failed


def _blob_store(backend: Any, settings: WorkerSettings) -> RedisBlobStore:
    """The blob store on the result backend's Redis (the app's effective backend: ``CELERY_RESULT_BACKEND``
    may override ``LLAVA_RESULT_BACKEND``), each read bounded (a hung store is a retryable fetch_failed)."""
    return RedisBlobStore(backend_client(backend, BLOB_READ_TIMEOUT), settings.result_expires)


def _bounded_client(backend: Any) -> Any:
    """The ledger's client of the result backend's Redis, every operation bounded by :data:`REDIS_TIMEOUT`
    (the ledger retries: a held job's arrival, the attempt writer's idempotent writes)."""
    return backend_client(backend, REDIS_TIMEOUT)


class LlavaConsumer(Consumer):
    """Celery's consumer, except that a llava job whose message cannot be decoded (pickle, bad JSON, a
    malformed envelope) ends ``invalid_request`` in the result backend instead of vanishing, that the
    message body (it may hold image bytes) is never logged, and that it reconnects at the pace the broker
    transport options give."""

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's reconnect loop, paced by the transport options' ``interval_*`` as kombu paces a publish's
        (Celery leaves kombu's defaults here, pauses growing by 2 s to 30 s: a worker would sit idle for up
        to half a minute after Redis, or its Sentinel-promoted replica, answers again)."""
        options = conn.transport_options or {}
        keys = ("interval_start", "interval_step", "interval_max")
        pace = {key: options[key] for key in keys if key in options}
        conn.ensure_connection = functools.partial(conn.ensure_connection, **pace)
        return super().ensure_connected(conn)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse(message, exc)
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, exc)
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """An unknown ``llava.*`` task (a typo, a newer client) ends ``invalid_request``; others as Celery."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        task = headers.get("task")
        if not (isinstance(task, str) and task.startswith("llava.")):
            super().on_unknown_task(body, message, exc)
            return
        log.error("refused a job for unknown task %r (id %r)", task, headers.get("id"))
        error = InvalidRequest(f"unknown task {task[:80]!r}: this worker serves {', '.join(TASKS)}")
        self._store_refusal(headers.get("id"), error)
        message.reject_log_error(log, self.connection_errors)

    def _refuse(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id, task = headers.get("id"), headers.get("task")
        log.error(
            "refused a message that cannot be decoded (task %r, id %r, content type %r): %s",
            task, job_id, message.content_type, type(exc).__name__,
        )  # fmt: skip
        if not isinstance(job_id, str) or task not in TASKS:
            return
        error = InvalidRequest(
            f"the message could not be decoded ({type(exc).__name__}; content type "
            f"{message.content_type!r}): send JSON (see the wire contract)"
        )
        self._store_refusal(job_id, error)

    def _store_refusal(self, job_id: Any, error: InvalidRequest) -> None:
        """Store ``error`` as the job's outcome, unless the id already succeeded (a malformed duplicate of a
        done job must not overwrite its result)."""
        if not isinstance(job_id, str):
            return
        try:
            if self.app.backend.get_task_meta(job_id).get("status") == states.SUCCESS:
                return
            self.app.backend.mark_as_failure(job_id, error)
        except Exception as store_error:
            log.warning("could not store the refusal of job %s: %s", job_id, store_error)


def live_peers(app: Celery, settings: WorkerSettings) -> dict[str, dict[str, Any]] | None:
    """The health of the live workers on this broker (None: the broker did not answer in time)."""
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=settings.peer_check_timeout)
            return worker_health(app, timeout=settings.peer_check_timeout)
    except Exception as exc:
        log.warning("could not ask the broker for live workers (%s): their settings are not checked", exc)
        return None


def conflicting_peers(peers: dict[str, dict[str, Any]], settings: WorkerSettings) -> dict[str, Any]:
    """Live workers whose visibility timeout differs from ours: ``{node: their value}``.

    kombu's Redis transport restores any unacknowledged job older than the *restoring* worker's visibility
    timeout, running jobs of other workers included: workers on one broker must agree on it.
    """
    own = settings.visibility_timeout
    return {
        node: info.get("visibility_timeout")
        for node, info in peers.items()
        if info.get("visibility_timeout") not in (None, own)
    }


SELF = "(this worker)"


def disagreeing_peers(peers: dict[str, dict[str, Any]], settings: WorkerSettings) -> list[str]:
    """One line per outcome-changing setting that live workers of our queues set otherwise than we do."""
    own = {"queues": settings.consumed_queues, OUTCOME_SETTINGS_KEY: outcome_settings(settings)}
    lines = []
    for queue, names in outcome_differences({**peers, SELF: own}).items():
        if queue not in settings.consumed_queues:  # others' queues: status reports them, not our start
            continue
        for name, values in names.items():
            ours = values.pop(SELF, None)
            others = {node: value for node, value in values.items() if value != ours}
            if others:
                shown = ", ".join(f"{node}: {value}" for node, value in sorted(others.items()))
                lines.append(f"queue {queue}: LLAVA_{name.upper()} is {ours} here, {shown}")
    return lines
