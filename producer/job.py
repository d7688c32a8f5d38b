"""``Job``: the handle of a submitted job; its typed result or its coded error."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Generic, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult
from pydantic import ValidationError

from producer.broker import broker_guard
from producer.contract import RESULT_MODELS, CaptionResult, ClassifyResult, VQAResult, validation_message
from producer.errors import BrokerUnavailable, InternalError, LlavaError, ResultTimeout, WorkerLost

R = TypeVar("R", CaptionResult, VQAResult, ClassifyResult)

# a result's "kind" -> its model, for a handle rebuilt from the id alone
_MODEL_BY_KIND = {model.model_fields["kind"].default: model for model in RESULT_MODELS.values()}
_ASYNC_SLICE = 1.0  # Job.wait() holds an executor thread at most this long at a time
_WAIT_SLICE = 1.0  # longest single wait on the result channel before the deadline is looked at again


class Job(Generic[R]):
    """A submitted job. ``id`` is the Celery task id; :meth:`get` (or ``await`` :meth:`wait`) returns the
    typed result or raises the job's :class:`~producer.errors.LlavaError`.

    ``task_name`` is known for a job this process sent or rebuilt with a name; a handle rebuilt from the id
    alone (``client.job(job_id)``) picks its result model from the result's ``kind``.
    """

    def __init__(
        self,
        async_result: AsyncResult,
        result_model: type[R] | None,
        default_timeout: float,
        task_name: str | None = None,
    ) -> None:
        self._async = async_result
        self._result_model: type[R] | None = result_model
        self._default_timeout = default_timeout
        self.task_name = task_name

    def __repr__(self) -> str:
        return f"<Job {self.task_name or 'llava.?'} {self.id} {self.state}>"

    @property
    def id(self) -> str:
        return str(self._async.id)

    @property
    def async_result(self) -> AsyncResult:
        """The underlying Celery :class:`~celery.result.AsyncResult`."""
        return self._async

    @property
    def state(self) -> str:
        """Celery state: PENDING (queued, running, or an unknown id), SUCCESS or FAILURE. (The worker does not
        store STARTED in the result backend; Flower shows it from task events.)"""
        with broker_guard(f"reading the state of job {self.id}"):
            return str(self._async.state)

    def ready(self) -> bool:
        """Whether the job finished (succeeded or failed). One read of the result backend until it has;
        raises :class:`~producer.errors.BrokerUnavailable` if Redis does not answer."""
        with broker_guard(f"reading the result of job {self.id}"):
            return bool(self._async.ready())

    def get(self, timeout: float | None = None) -> R:
        """Wait for the result (``timeout`` seconds, default from settings).

        Raises the job's :class:`~producer.errors.LlavaError` if it failed,
        :class:`~producer.errors.ResultTimeout` if nothing arrived in time (the job may still finish; its
        result subscription is released, and a later ``get`` subscribes again), or
        :class:`~producer.errors.BrokerUnavailable` if Redis does not answer.
        """
        wait = self._default_timeout if timeout is None else timeout
        try:
            payload = self._payload(wait)
        except CeleryTimeoutError:
            self.release()
            raise self._timed_out(wait) from None
        except BrokerUnavailable:
            self.forget_subscription()
            raise
        return self._parse(payload)

    async def wait(self, timeout: float | None = None) -> R:
        """:meth:`get` for asyncio: waits in the loop's default executor, never blocking the event loop.

        The wait runs in slices of at most a second, so a cancelled ``wait`` gives its thread back within a
        second and many concurrent waits take turns on the executor's threads. To await many jobs, prefer
        :meth:`LlavaClient.as_completed_async` (one thread for all of them).
        """
        loop = asyncio.get_running_loop()
        wait = self._default_timeout if timeout is None else timeout
        deadline = loop.time() + wait
        try:
            while True:
                step = max(0.0, min(_ASYNC_SLICE, deadline - loop.time()))
                try:
                    payload = await loop.run_in_executor(None, self._payload, step)
                except CeleryTimeoutError:
                    if loop.time() >= deadline:
                        raise self._timed_out(wait) from None
                else:
                    return self._parse(payload)
        except (ResultTimeout, asyncio.CancelledError):
            self.release()
            raise
        except BrokerUnavailable:
            self.forget_subscription()
            raise

    def release(self) -> None:
        """Stop waiting for this job's result message (the job keeps running and the handle keeps working).
        :meth:`get` and the collectors do this themselves."""
        with broker_guard(f"releasing job {self.id}"):
            self._async.backend.remove_pending_result(self._async)

    def forget_subscription(self) -> None:
        """:meth:`release` after Redis failed: the subscription died with its connection, so only the
        bookkeeping is dropped (a later unsubscribe of a dead connection would fail in ``__del__``)."""
        with contextlib.suppress(BrokerUnavailable):
            self.release()

    def _timed_out(self, wait: float) -> ResultTimeout:
        return ResultTimeout(f"job {self.id} gave no result within {wait:g} s (state {self.state})")

    def _payload(self, wait: float) -> Any:
        """The raw result, waiting up to ``wait`` s; a failure raises its LlavaError (CeleryTimeoutError
        when nothing arrived)."""
        try:
            with broker_guard(f"waiting for the result of job {self.id}"):
                self._await_result(wait)
                return self._async.get(timeout=wait, propagate=True)
        except (CeleryTimeoutError, LlavaError):
            raise
        except WorkerLostError as exc:
            raise WorkerLost(f"job {self.id}: {exc}") from exc
        except Exception as exc:  # an error type this process cannot rebuild
            raise InternalError(f"job {self.id} failed: {type(exc).__name__}: {exc}") from exc

    def _await_result(self, wait: float) -> None:
        """Wait up to ``wait`` s for the result on the backend's result channel, so that Celery's ``get``
        then finds it in the handle (CeleryTimeoutError if it did not come). Celery's own wait loop yields
        with ``sleep(0)`` five times a job (a greenlet switch; ~80 µs each on this machine's VM, more under
        load), a tenth of the queue's own round trip. Backends without a result consumer: Celery waits."""
        backend = self._async.backend
        consumer = getattr(backend, "result_consumer", None)
        if consumer is None or self._async.on_ready.ready:
            return
        backend.add_pending_result(self._async)  # subscribes to the job's channel
        if self._async.ready():  # stored before the subscription: read now, so unsubscribe again
            self.release()
            return
        deadline = time.monotonic() + wait
        while not self._async.on_ready.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CeleryTimeoutError(f"no result within {wait:g} s")
            with contextlib.suppress(TimeoutError):  # socket.timeout: nothing arrived in this slice
                consumer.drain_events(timeout=min(remaining, _WAIT_SLICE))

    def _parse(self, payload: Any) -> R:
        kind = payload.get("kind") if isinstance(payload, dict) else None
        model = self._result_model or _MODEL_BY_KIND.get(str(kind))
        if model is None:
            raise InternalError(f"job {self.id}: result of unknown kind {kind!r}")
        try:
            return model.model_validate(payload)  # type: ignore[return-value]
        except ValidationError as exc:
            raise InternalError(f"job {self.id}: malformed result: {validation_message(exc)}") from exc
