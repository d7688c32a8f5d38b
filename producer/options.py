"""Where and how a job is sent: :class:`SendOptions`, split from a send's keyword arguments (the rest are
generation parameters)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from celery import Celery
from celery.canvas import Signature

from producer.contract import DEFAULT_PRIORITY, MAX_PRIORITY, GenerationParams, model_queue, wire_priority
from producer.errors import InvalidRequest

CALLBACK_QUEUE = "celery"  # where a callback given by name goes: the queue a plain Celery worker consumes


@dataclass(frozen=True)
class SendOptions:
    """Where and how a job is sent.

    - ``model``: the short name of the checkpoint to run it (its queue is ``llava.<model>``, see
      :func:`~producer.contract.model_queue`); ``queue`` names a queue directly; neither: the default queue.
    - ``priority``: 0 (lowest) to ``MAX_PRIORITY`` (most urgent), default ``DEFAULT_PRIORITY`` (both in
      :mod:`producer.contract`). On Redis, where Celery serves 0 first, it is sent as
      ``MAX_PRIORITY - priority`` (:func:`~producer.contract.wire_priority`).
    - ``job_id``: your own id, making the send idempotent (see :meth:`LlavaClient._submit`).
    - ``timeout_s``: the job's time on the worker, capped by its ``job_timeout``.
    - ``on_success``: a Celery task (its name, or a :class:`~celery.canvas.Signature`) the worker sends
      when the job succeeds, with the result (a JSON object) as its one positional argument (a Celery
      ``link``). ``on_error``: one sent with the failed job's id when it fails (``link_error``; read the
      error with ``client.job(job_id).get()``). Tasks given by name go to ``callback_queue`` (default
      :data:`CALLBACK_QUEUE`, the queue a plain Celery worker consumes); a Signature keeps its own routing.
    """

    model: str | None = None
    queue: str | None = None
    priority: int = DEFAULT_PRIORITY
    job_id: str | None = None
    timeout_s: float | None = None
    on_success: str | Signature | None = None
    on_error: str | Signature | None = None
    callback_queue: str = CALLBACK_QUEUE

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[SendOptions, dict[str, Any]]:
        """``options`` -> (send options, generation parameters); unknown names are an ``InvalidRequest``."""
        names = {f.name for f in fields(cls)}
        unknown = set(options) - names - set(GenerationParams.model_fields)
        if unknown:
            allowed = ", ".join([*names, *GenerationParams.model_fields])
            raise InvalidRequest(f"unknown argument(s) {sorted(unknown)}; options are {allowed}")
        send = cls(**{k: v for k, v in options.items() if k in names and v is not None})
        if not isinstance(send.priority, int) or not 0 <= send.priority <= MAX_PRIORITY:
            raise InvalidRequest(
                f"priority must be an integer from 0 to {MAX_PRIORITY}, not {send.priority!r}"
            )
        generation = {
            k: v for k, v in options.items() if k in GenerationParams.model_fields and v is not None
        }
        return send, generation

    def queue_name(self, default: str) -> str:
        if self.queue:
            return self.queue
        return model_queue(self.model) if self.model else default

    def wire_priority(self, app: Celery) -> int:
        return wire_priority(self.priority, app.conf.broker_url)

    def callback(self, app: Celery, task: str | Signature | None) -> Signature | None:
        """``on_success``/``on_error`` as a Celery signature (by name: routed to ``callback_queue``)."""
        if task is None or isinstance(task, Signature):
            return task
        if isinstance(task, str) and task.strip():
            return app.signature(task.strip(), queue=self.callback_queue)
        raise InvalidRequest(f"a callback must be a task name or a Celery signature, not {task!r}")
