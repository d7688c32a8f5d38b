"""What a job does, between the Celery task and the runtime: validate, load the image, run, shape the result.

``Service.run`` is the single place where exceptions become coded :mod:`producer.errors` (the worker's
"interceptor"): tasks stay thin and never convert errors themselves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from producer.client import validation_message
from producer.contract import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_CLASSIFY_PROMPT,
    REQUEST_MODELS,
    RESULT_MODELS,
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    ClassifyRequest,
    GenerationParams,
    Timings,
)
from producer.errors import InternalError, InvalidRequest, LlavaError
from producer.images import redact
from worker.images import load_image
from worker.runtime import Prompt, Runtime, Sampling
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What the queue tells us about a job: its id, the node running it, when the producer sent it."""

    job_id: str
    worker: str
    sent_at: float | None = None


@dataclass
class _Stats:
    jobs_done: int = 0
    jobs_failed: int = 0
    last_error: dict[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


class Service:
    """Serves caption, VQA and classify jobs with one :class:`Runtime` (loaded by :meth:`start`)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self._stats = _Stats()
        self._handlers = {TASK_CAPTION: self._caption, TASK_VQA: self._vqa, TASK_CLASSIFY: self._classify}

    def start(self) -> Runtime:
        """Load the model (once per process)."""
        if self.runtime is None:
            self.runtime = Runtime(self.settings)
        return self.runtime

    def run(self, task_name: str, request: Any, context: JobContext) -> dict[str, Any]:
        """Serve one job; every failure leaves as a coded :class:`LlavaError`, logged once."""
        started = time.perf_counter()
        try:
            result = self._handlers[task_name](self._parse(task_name, request), context, started)
        except LlavaError as exc:
            self._failed(exc, context, task_name)
            raise
        except Exception as exc:
            log.exception("job %s (%s) failed unexpectedly", context.job_id, task_name)
            error = InternalError(f"{type(exc).__name__}: {exc}")
            self._failed(error, context, task_name)
            raise error from None
        with self._stats.lock:
            self._stats.jobs_done += 1
        return result

    def health(self) -> dict[str, Any]:
        """Per-worker health: model loaded, device, loads, jobs done and failed, last error."""
        runtime = self.runtime
        with self._stats.lock:
            stats = {
                "jobs_done": self._stats.jobs_done,
                "jobs_failed": self._stats.jobs_failed,
                "last_error": self._stats.last_error,
            }
        return {
            "model_loaded": runtime is not None,
            "loads": Runtime.loads,
            "queues": self.settings.consumed_queues,
            **(runtime.info() if runtime else {"model": self.settings.served_model_name}),
            **stats,
        }

    def _failed(self, error: LlavaError, context: JobContext, task_name: str) -> None:
        log.warning("job %s (%s) failed: %s", context.job_id, task_name, error)
        with self._stats.lock:
            self._stats.jobs_failed += 1
            self._stats.last_error = {"job_id": context.job_id, **error.to_dict()}

    def _parse(self, task_name: str, request: Any) -> Any:
        if not isinstance(request, dict):
            raise InvalidRequest(f"the 'request' kwarg must be a JSON object, got {type(request).__name__}")
        try:
            parsed = REQUEST_MODELS[task_name].model_validate(request)
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        self._check_limits(parsed)
        return parsed

    def _check_limits(self, request: Any) -> None:
        """This worker's limits (settings), at or below the contract's hard limits."""
        limits = self.settings
        for name in ("prompt", "question"):
            text = getattr(request, name, None)
            if text is not None and len(text) > limits.max_text_chars:
                raise InvalidRequest(
                    f"{name} is {len(text)} characters, over the cap of {limits.max_text_chars} "
                    "(max_text_chars)"
                )
        labels = getattr(request, "labels", None) or []
        if len(labels) > limits.max_labels:
            raise InvalidRequest(f"{len(labels)} labels, over the cap of {limits.max_labels} (max_labels)")
        for label in labels:
            if len(label) > limits.max_label_chars:
                raise InvalidRequest(
                    f"label {label[:20]!r}… is over {limits.max_label_chars} characters (max_label_chars)"
                )
        self._sampling(request.generation)  # max_new_tokens against max_new_tokens_cap

    def _sampling(self, params: GenerationParams) -> Sampling:
        cap = self.settings.max_new_tokens_cap
        wanted = params.max_new_tokens or self.settings.max_new_tokens
        if wanted > cap:
            raise InvalidRequest(
                f"max_new_tokens {wanted} is over this worker's cap of {cap} (max_new_tokens_cap)"
            )
        return Sampling(max_new_tokens=wanted, temperature=params.temperature, top_p=params.top_p)

    def _runtime(self) -> Runtime:
        if self.runtime is None:
            raise InternalError("the model is not loaded (Service.start() was not called)")
        return self.runtime

    def _image(self, reference: str, context: JobContext) -> tuple[Any, float]:
        started = time.perf_counter()
        log.debug("job %s: loading image %s", context.job_id, redact(reference))
        image = load_image(reference, self.settings)
        return image, _ms(started)

    def _generate(self, task_name: str, request: Any, text: str, context: JobContext, started: float) -> dict:
        sampling = self._sampling(request.generation)
        image, image_ms = self._image(request.image, context)
        inference_started = time.perf_counter()
        output = self._runtime().generate([Prompt(image, text)], sampling)[0]
        fields = {"text": output.text} if task_name != TASK_CLASSIFY else {"label": output.text}
        return self._result(task_name, output, fields, context, started, image_ms, inference_started)

    def _caption(self, request: Any, context: JobContext, started: float) -> dict:
        return self._generate(
            TASK_CAPTION, request, request.prompt or DEFAULT_CAPTION_PROMPT, context, started
        )

    def _vqa(self, request: Any, context: JobContext, started: float) -> dict:
        return self._generate(TASK_VQA, request, request.question, context, started)

    def _classify(self, request: ClassifyRequest, context: JobContext, started: float) -> dict:
        prompt = request.prompt or DEFAULT_CLASSIFY_PROMPT
        if not request.labels:
            return self._generate(TASK_CLASSIFY, request, prompt, context, started)
        image, image_ms = self._image(request.image, context)
        inference_started = time.perf_counter()
        text = f"{prompt} Answer with one of: {', '.join(request.labels)}."
        output = self._runtime().score_labels([Prompt(image, text)], [request.labels])[0]
        probabilities = softmax(output.log_likelihoods)
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        fields = {
            "label": request.labels[best],
            "scores": dict(zip(request.labels, probabilities, strict=True)),
        }
        return self._result(TASK_CLASSIFY, output, fields, context, started, image_ms, inference_started)

    def _result(
        self,
        task_name: str,
        output: Any,
        fields: dict[str, Any],
        context: JobContext,
        started: float,
        image_ms: float,
        inference_started: float,
    ) -> dict[str, Any]:
        total_ms = _ms(started)
        since_sent_ms = None if context.sent_at is None else (time.time() - context.sent_at) * 1000
        timings = Timings(
            queued_ms=None if since_sent_ms is None else round(max(0.0, since_sent_ms - total_ms), 3),
            image_ms=image_ms,
            inference_ms=_ms(inference_started),
            total_ms=total_ms,
        )
        result = RESULT_MODELS[task_name](
            model=self.settings.served_model_name,
            worker=context.worker,
            prompt_tokens=output.prompt_tokens,
            image_tokens=output.image_tokens,
            generated_tokens=getattr(output, "generated_tokens", 0),
            timings=timings,
            **fields,
        )
        return result.model_dump(mode="json")


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)
