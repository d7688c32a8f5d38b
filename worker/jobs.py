"""One entry per job kind (caption, VQA, classify): how its request becomes the model's work
(:meth:`JobKind.decode`) and how the model's output becomes its result (:meth:`JobKind.encode`).

Adding a kind is its task name and models in :mod:`producer.contract` plus one :class:`JobKind` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.contract import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_CLASSIFY_PROMPT,
    DEFAULT_LABEL_QUESTION,
    REQUEST_MODELS,
    RESULT_MODELS,
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    CaptionRequest,
    ClassifyRequest,
    GenerationParams,
    Request,
    Timings,
    VQARequest,
    validation_message,
)
from producer.errors import InvalidRequest
from worker.batching import SCORE, BatchKey
from worker.runtime import LabelScores, Sampling
from worker.runtime.scoring import LabelQuery
from worker.settings import WorkerSettings


@dataclass(frozen=True)
class Work:
    """What a request asks of the model: a prompt, and labels to score or sampling to generate with."""

    text: str
    sampling: Sampling
    labels: list[str] | None = None
    query: LabelQuery | None = None  # with labels: how to score them
    thresholds: dict[str, float] | None = None  # multi-label: each label's threshold

    @property
    def key(self) -> BatchKey:
        """Which jobs it may share a model call with."""
        return SCORE if self.labels else BatchKey(self.sampling)

    @property
    def reserve(self) -> int:
        """Tokens it may add after its prompt (the processor's context check)."""
        return 0 if self.labels else self.sampling.max_new_tokens


@dataclass(frozen=True)
class JobKind:
    """A job kind: ``work`` builds its :class:`Work` from its request (its sampling already checked);
    ``answer`` gives its result's own fields from the model's output."""

    task_name: str
    work: Callable[[Any, Sampling], Work]
    answer: Callable[[Work, Any], dict[str, Any]]

    def decode(self, request: Any, settings: WorkerSettings) -> tuple[Request, Work]:
        """The request checked against the contract and this worker's limits, and its work."""
        if not isinstance(request, dict):
            raise InvalidRequest(f"the 'request' kwarg must be a JSON object, got {type(request).__name__}")
        try:
            parsed = REQUEST_MODELS[self.task_name].model_validate(request)
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        _check_limits(parsed, settings)
        return parsed, self.work(parsed, _sampling(parsed.generation, settings))

    def encode(self, work: Work, output: Any, timings: Timings, model: str, worker: str) -> dict[str, Any]:
        """The result on the wire (JSON-ready)."""
        result = RESULT_MODELS[self.task_name](
            model=model,
            worker=worker,
            prompt_tokens=output.prompt_tokens,
            image_tokens=output.image_tokens,
            generated_tokens=getattr(output, "generated_tokens", 0),
            timings=timings,
            **self.answer(work, output),
        )
        return result.model_dump(mode="json")


def _caption(request: CaptionRequest, sampling: Sampling) -> Work:
    return Work(request.prompt or DEFAULT_CAPTION_PROMPT, sampling)


def _vqa(request: VQARequest, sampling: Sampling) -> Work:
    return Work(request.question, sampling)


def _classify(request: ClassifyRequest, sampling: Sampling) -> Work:
    prompt = request.prompt or DEFAULT_CLASSIFY_PROMPT
    if not request.labels:
        return Work(prompt, sampling)
    if request.multi_label:
        question = request.question or DEFAULT_LABEL_QUESTION
        longest = question.replace("{label}", max(request.labels, key=len))  # sizes the context check
        thresholds = {label: request.threshold_of(label) for label in request.labels}
        return Work(longest, sampling, request.labels, LabelQuery(longest, question), thresholds)
    text = f"{prompt} Answer with one of: {', '.join(request.labels)}."
    return Work(text, sampling, request.labels, LabelQuery(text))


def _text(work: Work, output: Any) -> dict[str, Any]:
    return {"text": output.text}


def _classified(work: Work, output: Any) -> dict[str, Any]:
    """Without labels: the model's free-text answer; with labels: top label, scores, log-probs, and in
    multi-label mode the labels at or above their threshold."""
    if not work.labels:
        return {"label": output.text}
    return _label_fields(work.labels, output, work.thresholds)


def _label_fields(labels: list[str], output: LabelScores, thresholds: dict[str, float] | None) -> dict:
    best = max(range(len(labels)), key=output.scores.__getitem__)
    fields: dict[str, Any] = {
        "label": labels[best],
        "scores": dict(zip(labels, output.scores, strict=True)),
        "logprobs": dict(zip(labels, output.logprobs, strict=True)),
    }
    if thresholds is not None:
        given = zip(labels, output.scores, strict=True)
        fields["labels"] = [label for label, score in given if score >= thresholds[label]]
    return fields


JOB_KINDS: dict[str, JobKind] = {
    kind.task_name: kind
    for kind in (
        JobKind(TASK_CAPTION, _caption, _text),
        JobKind(TASK_VQA, _vqa, _text),
        JobKind(TASK_CLASSIFY, _classify, _classified),
    )
}


def _check_limits(request: Any, limits: WorkerSettings) -> None:
    """This worker's limits (settings), at or below the contract's hard limits."""
    for name in ("prompt", "question"):
        text = getattr(request, name, None)
        if text is not None and len(text) > limits.max_text_chars:
            raise InvalidRequest(
                f"{name} is {len(text)} characters, over the cap of {limits.max_text_chars} (max_text_chars)"
            )
    labels = getattr(request, "labels", None) or []
    if len(labels) > limits.max_labels:
        raise InvalidRequest(f"{len(labels)} labels, over the cap of {limits.max_labels} (max_labels)")
    for label in labels:
        if len(label) > limits.max_label_chars:
            raise InvalidRequest(
                f"label {label[:20]!r}… is over {limits.max_label_chars} characters (max_label_chars)"
            )


def _sampling(params: GenerationParams, settings: WorkerSettings) -> Sampling:
    cap = settings.max_new_tokens_cap
    wanted = params.max_new_tokens or settings.max_new_tokens
    if wanted > cap:
        raise InvalidRequest(
            f"max_new_tokens {wanted} is over this worker's cap of {cap} (max_new_tokens_cap)"
        )
    return Sampling(max_new_tokens=wanted, temperature=params.temperature, top_p=params.top_p)
