"""``LlavaClient``: submit LLaVA-NeXT jobs by task name and collect typed results.

Torch-free: imports Celery, pydantic and the contract only; tasks are sent by name (``send_task``).
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.exceptions import WorkerLostError
from celery.result import AsyncResult
from pydantic import BaseModel, ValidationError

from producer.app import create_celery_app
from producer.contract import (
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

    def caption(
        self,
        image: ImageInput,
        prompt: str | None = None,
        *,
        queue: str | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        **generation: Any,
    ) -> Job[CaptionResult]:
        """Describe ``image`` (``prompt`` defaults to "What is shown in this image?").

        ``timeout_s`` caps the job's time on the worker (``JobTimeout``); ``job_id`` makes the call idempotent
        (see :meth:`_submit`); ``generation``: ``max_new_tokens``, ``temperature``, ``top_p``.
        """
        fields = {"prompt": prompt, "timeout_s": timeout_s, "generation": self._generation(generation)}
        return self._submit(TASK_CAPTION, CaptionRequest, image, fields, queue, job_id)

    def vqa(
        self,
        image: ImageInput,
        question: str,
        *,
        queue: str | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        **generation: Any,
    ) -> Job[VQAResult]:
        """Answer ``question`` about ``image``."""
        fields = {"question": question, "timeout_s": timeout_s, "generation": self._generation(generation)}
        return self._submit(TASK_VQA, VQARequest, image, fields, queue, job_id)

    def classify(
        self,
        image: ImageInput,
        labels: list[str] | None = None,
        prompt: str | None = None,
        *,
        queue: str | None = None,
        timeout_s: float | None = None,
        job_id: str | None = None,
        **generation: Any,
    ) -> Job[ClassifyResult]:
        """Pick the most likely of ``labels``; without labels, the model's free-text class as ``label``."""
        generation_fields = self._generation(generation)
        fields = {"labels": labels, "prompt": prompt, "timeout_s": timeout_s, "generation": generation_fields}
        return self._submit(TASK_CLASSIFY, ClassifyRequest, image, fields, queue, job_id)

    def job(self, job_id: str, task_name: str) -> Job[Any]:
        """Rebuild a handle from a job id (e.g. in a later web request) and its task name."""
        if task_name not in RESULT_MODELS:
            raise InvalidRequest(f"unknown task {task_name!r}; expected one of {sorted(RESULT_MODELS)}")
        return Job(self.app.AsyncResult(job_id), RESULT_MODELS[task_name], self.settings.result_timeout)

    @staticmethod
    def _generation(params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(GenerationParams.model_fields)
        if unknown:
            allowed = ", ".join(GenerationParams.model_fields)
            raise InvalidRequest(f"unknown argument(s) {sorted(unknown)}; generation options are {allowed}")
        return {key: value for key, value in params.items() if value is not None}

    def _submit(
        self,
        task_name: str,
        model: type[BaseModel],
        image: ImageInput,
        fields: dict[str, Any],
        queue: str | None,
        job_id: str | None = None,
    ) -> Job[Any]:
        """Validate and send. With ``job_id``: if a job with that id already succeeded (and its result has
        not expired), its handle is returned and nothing is sent; otherwise the job is sent under that id,
        and a worker that finds a stored success for it returns that instead of running it again."""
        wire_image = to_wire(image, self.settings.max_image_bytes)
        try:
            request = model(image=wire_image, **{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        result_model = RESULT_MODELS[task_name]
        if job_id is not None:
            existing = self.app.AsyncResult(job_id)
            if existing.state == states.SUCCESS:
                return Job(existing, result_model, self.settings.result_timeout)
        payload = request.model_dump(mode="json", exclude_defaults=True)
        shown = {**payload, "image": redact(wire_image)}
        async_result = self.app.send_task(
            task_name,
            task_id=job_id,
            kwargs={"request": payload},
            queue=queue or self.settings.default_queue,
            kwargsrepr=repr({"request": shown}),
            headers={SENT_AT_HEADER: time.time()},
        )
        return Job(async_result, result_model, self.settings.result_timeout)

    def close(self) -> None:
        """Release broker and backend connections."""
        self.app.close()
