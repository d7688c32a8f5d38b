"""``LlavaClient``: submit LLaVA-NeXT jobs by task name and collect typed results.

Torch-free: imports Celery, pydantic and the contract only; tasks are sent by name (``send_task``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult
from pydantic import BaseModel, ValidationError

from producer.app import create_celery_app
from producer.contract import (
    DEFAULT_PRIORITY,
    RESULT_MODELS,
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    CaptionRequest,
    CaptionResult,
    ClassifyRequest,
    ClassifyResult,
    GenerationParams,
    VQARequest,
    VQAResult,
    model_queue,
)
from producer.errors import InternalError, InvalidRequest, LlavaError, ResultTimeout, WorkerLost
from producer.images import ImageInput, redact, to_wire
from producer.settings import ClientSettings, load_settings

R = TypeVar("R", CaptionResult, VQAResult, ClassifyResult)

SENT_AT_HEADER = "llava_sent_at"


def validation_message(exc: ValidationError) -> str:
    """One line per problem: ``field: what is wrong``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True)
class SendOptions:
    """Where and how a job is sent.

    - ``model``: the short name of the checkpoint to run it (its queue is ``llava.<model>``, see
      :func:`~producer.contract.model_queue`); ``queue`` names a queue directly; neither: the default queue.
    - ``priority``: 0 (lowest) to 9 (most urgent), default 4. On Redis, where Celery serves 0 first, it is
      sent as ``9 - priority``.
    - ``job_id``: your own id, making the send idempotent (see :meth:`LlavaClient._submit`).
    - ``timeout_s``: the job's time on the worker, capped by its ``job_timeout``.
    """

    model: str | None = None
    queue: str | None = None
    priority: int = DEFAULT_PRIORITY
    job_id: str | None = None
    timeout_s: float | None = None

    @classmethod
    def split(cls, options: dict[str, Any]) -> tuple[SendOptions, dict[str, Any]]:
        """``options`` -> (send options, generation parameters); unknown names are an ``InvalidRequest``."""
        names = {f.name for f in fields(cls)}
        unknown = set(options) - names - set(GenerationParams.model_fields)
        if unknown:
            allowed = ", ".join([*names, *GenerationParams.model_fields])
            raise InvalidRequest(f"unknown argument(s) {sorted(unknown)}; options are {allowed}")
        send = cls(**{k: v for k, v in options.items() if k in names and v is not None})
        if not isinstance(send.priority, int) or not 0 <= send.priority <= 9:
            raise InvalidRequest(f"priority must be an integer from 0 to 9, not {send.priority!r}")
        generation = {
            k: v for k, v in options.items() if k in GenerationParams.model_fields and v is not None
        }
        return send, generation

    def queue_name(self, default: str) -> str:
        if self.queue:
            return self.queue
        return model_queue(self.model) if self.model else default

    def wire_priority(self, app: Celery) -> int:
        redis = app.conf.broker_url.split("://", 1)[0] in ("redis", "rediss", "sentinel")
        return 9 - self.priority if redis else self.priority


class Job(Generic[R]):
    """A submitted job. ``id`` is the Celery task id; :meth:`get` returns the typed result or raises."""

    def __init__(self, async_result: AsyncResult, result_model: type[R], default_timeout: float) -> None:
        self._async = async_result
        self._result_model: type[R] = result_model
        self._default_timeout = default_timeout

    def __repr__(self) -> str:
        return f"<Job {self._result_model.__name__} {self.id} {self.state}>"

    @property
    def id(self) -> str:
        return str(self._async.id)

    @property
    def state(self) -> str:
        """Celery state: PENDING (queued, running, or an unknown id), SUCCESS or FAILURE. (The worker does not
        store STARTED in the result backend; Flower shows it from task events.)"""
        return str(self._async.state)

    def ready(self) -> bool:
        return bool(self._async.ready())

    def get(self, timeout: float | None = None) -> R:
        """Wait for the result (``timeout`` seconds, default from settings).

        Raises the job's :class:`~producer.errors.LlavaError` if it failed, or
        :class:`~producer.errors.ResultTimeout` if nothing arrived in time (the job may still finish).
        """
        wait = self._default_timeout if timeout is None else timeout
        try:
            payload = self._async.get(timeout=wait, propagate=True)
        except CeleryTimeoutError:
            raise ResultTimeout(
                f"job {self.id} gave no result within {wait:g} s (state {self.state})"
            ) from None
        except LlavaError:
            raise
        except WorkerLostError as exc:
            raise WorkerLost(f"job {self.id}: {exc}") from exc
        except Exception as exc:  # an error type this process cannot rebuild
            raise InternalError(f"job {self.id} failed: {type(exc).__name__}: {exc}") from exc
        try:
            return self._result_model.model_validate(payload)
        except ValidationError as exc:
            raise InternalError(f"job {self.id}: malformed result: {validation_message(exc)}") from exc


class LlavaClient:
    """Submit caption, VQA and classify jobs. Every method returns a :class:`Job` at once.

    Images: an http(s) URL (fetched by the worker), a ``data:`` URI, a local path (``str``/``Path``),
    ``bytes`` or a PIL image (sent inline as a ``data:`` URI, checked against ``max_image_bytes`` first).
    """

    def __init__(self, settings: ClientSettings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or load_settings(ClientSettings)
        self.app = app or create_celery_app(self.settings)

    def caption(self, image: ImageInput, prompt: str | None = None, **options: Any) -> Job[CaptionResult]:
        """Describe ``image`` (``prompt`` defaults to "What is shown in this image?").

        ``options``: where and how to send it (:class:`SendOptions`: ``model``, ``queue``, ``priority``,
        ``job_id``, ``timeout_s``) and decoding (``max_new_tokens``, ``temperature``, ``top_p``).
        """
        return self._submit(TASK_CAPTION, CaptionRequest, image, {"prompt": prompt}, options)

    def vqa(self, image: ImageInput, question: str, **options: Any) -> Job[VQAResult]:
        """Answer ``question`` about ``image``. ``options`` as for :meth:`caption`."""
        return self._submit(TASK_VQA, VQARequest, image, {"question": question}, options)

    def classify(
        self, image: ImageInput, labels: list[str] | None = None, prompt: str | None = None, **options: Any
    ) -> Job[ClassifyResult]:
        """Pick the most likely of ``labels``; without labels, the model's free-text class as ``label``.
        ``options`` as for :meth:`caption`."""
        return self._submit(
            TASK_CLASSIFY, ClassifyRequest, image, {"labels": labels, "prompt": prompt}, options
        )

    def job(self, job_id: str, task_name: str) -> Job[Any]:
        """Rebuild a handle from a job id (e.g. in a later web request) and its task name."""
        if task_name not in RESULT_MODELS:
            raise InvalidRequest(f"unknown task {task_name!r}; expected one of {sorted(RESULT_MODELS)}")
        return Job(self.app.AsyncResult(job_id), RESULT_MODELS[task_name], self.settings.result_timeout)

    def _submit(
        self, task_name: str, model: type[BaseModel], image: ImageInput, fields: dict[str, Any], options: dict
    ) -> Job[Any]:
        """Validate and send. With ``job_id``: if a job with that id already succeeded (and its result has
        not expired), its handle is returned and nothing is sent; otherwise the job is sent under that id,
        and a worker that finds a stored success for it returns that instead of running it again."""
        send, generation = SendOptions.split(options)
        wire_image = to_wire(image, self.settings.max_image_bytes)
        try:
            params = {**fields, "timeout_s": send.timeout_s, "generation": generation}
            request = model(image=wire_image, **{k: v for k, v in params.items() if v is not None})
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        result_model = RESULT_MODELS[task_name]
        if send.job_id is not None:
            existing = self.app.AsyncResult(send.job_id)
            if existing.state == states.SUCCESS:
                return Job(existing, result_model, self.settings.result_timeout)
        payload = request.model_dump(mode="json", exclude_defaults=True)
        shown = {**payload, "image": redact(wire_image)}
        async_result = self.app.send_task(
            task_name,
            task_id=send.job_id,
            kwargs={"request": payload},
            queue=send.queue_name(self.settings.default_queue),
            priority=send.wire_priority(self.app),
            kwargsrepr=repr({"request": shown}),
            headers={SENT_AT_HEADER: time.time()},
        )
        return Job(async_result, result_model, self.settings.result_timeout)

    def close(self) -> None:
        """Release broker and backend connections."""
        self.app.close()
