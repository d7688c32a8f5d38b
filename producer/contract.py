"""The wire contract between producers and workers: task names, request and result models, and the facts
both sides share (image reference kinds, priorities, the broker kind, the health command, the limits).

Any Celery client can enqueue a job: send task ``llava.caption`` | ``llava.vqa`` | ``llava.classify`` with
one keyword argument, ``request``, holding the request model as a JSON object. The result is the matching
result model as a JSON object. Failures are stored as coded errors (see :mod:`producer.errors`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from producer.errors import ImageTooLarge, InvalidImage

TASK_CAPTION = "llava.caption"
TASK_VQA = "llava.vqa"
TASK_CLASSIFY = "llava.classify"
TASKS = (TASK_CAPTION, TASK_VQA, TASK_CLASSIFY)
TASK_NOOP = "llava.noop"  # no request, returns {"worker": node}: the queue's own round trip
# Message header: when the producer sent the job (epoch seconds); the worker derives queued_ms from it.
SENT_AT_HEADER = "llava_sent_at"
# Message header of a job sent with a blob image: this send's claim on the image (a token unique to the send,
# see producer.blobs), which the worker releases when the job ends. Each send claims for itself, so a resend
# under the same job id keeps its image when the first run ends. A message without it (a foreign client, an
# older producer) claimed the image under its job id, and the worker releases that.
CLAIM_HEADER = "llava_image_claim"
QUEUE_PREFIX = "llava."
HEALTH_COMMAND = "llava_health"  # the worker's inspect command (worker/control.py): its health as a dict
# The health entry holding a worker's outcome-changing settings (worker.settings.OUTCOME_SETTINGS)
OUTCOME_SETTINGS_KEY = "outcome_settings"
# Job priorities (LlavaClient): 0 lowest .. MAX_PRIORITY most urgent; see wire_priority for what is sent.
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 4


def model_queue(model: str) -> str:
    """The queue of the workers serving ``model`` (a config's ``model_name``), e.g. ``llava.mistral-7b``."""
    return f"{QUEUE_PREFIX}{model}"


def is_redis_url(url: str) -> bool:
    """True for a Redis broker or result backend URL (``redis://``, ``rediss://``, ``sentinel://``)."""
    return url.split("://", 1)[0] in ("redis", "rediss", "sentinel")


def wire_priority(priority: int, broker_url: str) -> int:
    """The Celery priority a job of ``priority`` is sent with: Redis serves its 0 first, so there it is
    ``MAX_PRIORITY - priority``; other brokers serve the highest first and get ``priority`` as it is."""
    return MAX_PRIORITY - priority if is_redis_url(broker_url) else priority


DEFAULT_CAPTION_PROMPT = "What is shown in this image?"
DEFAULT_CLASSIFY_PROMPT = "Classify the object in the image."
# Multi-label classify: each label is asked this question (``{label}`` replaced) and scored as the model's
# P(answer "Yes") / (P("Yes") + P("No")); a label is given when its score is at or above its threshold.
DEFAULT_LABEL_QUESTION = "Is there {label} in this image? Answer Yes or No."
DEFAULT_THRESHOLD = 0.5

# Hard limits of the contract; a worker may enforce lower ones from its settings.
MAX_TEXT_CHARS = 2000
MAX_LABELS = 100
MAX_LABEL_CHARS = 100
MAX_NEW_TOKENS_LIMIT = 4096
# Sampling temperatures: 0 (greedy) or MIN_TEMPERATURE..MAX_TEMPERATURE. vLLM raises any temperature below
# 0.01 to 0.01 ("may cause numerical errors nan or inf"); here it is refused, so both engines give a request
# the same outcome. OpenAI's API takes 0 to 2.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0

# An image stored in the blob store (see producer.blobs): "blob:sha256:" + 64 lowercase hex digits.
BLOB_PREFIX = "blob:sha256:"
_BLOB_REFERENCE = re.compile(r"blob:sha256:[0-9a-f]{64}")


ImageKind = Literal["url", "data", "blob", "path"]


def image_kind(image: str) -> ImageKind | None:
    """What a wire ``image`` names: an http(s) ``url``, a ``data`` URI, a ``blob`` reference (by its prefix:
    :func:`blob_digest` checks the rest) or an absolute local ``path``; ``None``: none of them. Schemes are
    matched case-insensitively."""
    head = image[:8].lower()
    if head.startswith(("http://", "https://")):
        return "url"
    if head.startswith("data:"):
        return "data"
    if image.startswith(BLOB_PREFIX):
        return "blob"
    return "path" if image.startswith("/") else None


def is_blob_reference(image: str) -> bool:
    return _BLOB_REFERENCE.fullmatch(image) is not None


def blob_digest(reference: str) -> str:
    """The sha256 hex digest a blob reference names (``ValueError`` if it is not one)."""
    if not is_blob_reference(reference):
        raise ValueError(f"not a blob reference (want {BLOB_PREFIX}<64 hex digits>): {reference[:80]!r}")
    return reference.removeprefix(BLOB_PREFIX)


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The image bytes of a ``data:<mime>;base64,<payload>`` URI, at most ``max_bytes`` (``max_image_bytes``).

    The payload may be MIME-wrapped (whitespace is dropped). Raises :class:`~producer.errors.InvalidImage`
    when it is not such a URI, not valid base64 or empty, and :class:`~producer.errors.ImageTooLarge` over the
    cap: checked on the text before decoding (with room for MIME line breaks, 2 in 78 characters), then on the
    bytes.
    """
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidImage("a data: URI must look like data:<mime>;base64,<payload>")
    if len(payload) * 3 // 4 > max_bytes * 1.05 + 4:
        raise ImageTooLarge(f"the data: URI image is over the {max_bytes}-byte cap (max_image_bytes)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"data: URI payload is not valid base64: {exc}") from None
    if not data:
        raise InvalidImage("data: URI payload is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(
            f"the data: URI image is {len(data)} bytes, over the {max_bytes}-byte cap (max_image_bytes)"
        )
    return data


def redact_url(url: str) -> str:
    """What of an image URL may be logged or shown: no credentials, query string or fragment (they may
    hold tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    suffix = "?…" if parts.query else ""
    shown = urlunsplit((parts.scheme, host, parts.path, "", "")) + suffix
    return shown if len(shown) <= 200 else shown[:197] + "..."


# The processor expands this placeholder into the image's tokens; in user text it would break the prompt.
IMAGE_PLACEHOLDER = "<image>"


def _no_image_placeholder(value: str) -> str:
    if IMAGE_PLACEHOLDER in value:
        raise ValueError(f"text must not contain the image placeholder {IMAGE_PLACEHOLDER!r}")
    return value


Text = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS),
    AfterValidator(_no_image_placeholder),
]
Label = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_LABEL_CHARS),
    AfterValidator(_no_image_placeholder),
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _WireModel(_Model):
    """A request part: strict types on the wire (``"12"`` or ``true`` is not a token count)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GenerationParams(_WireModel):
    """Decoding parameters. Greedy (``temperature=0``) unless asked otherwise."""

    max_new_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="None: the worker's default"
    )
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_TEMPERATURE,
        description=f"0 means greedy decoding; sampling takes {MIN_TEMPERATURE} to {MAX_TEMPERATURE} (a "
        "smaller one would overflow the logits it divides)",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling: the mass kept")

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, value: float) -> float:
        if 0.0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: a smaller temperature overflows the "
                "logits it divides"
            )
        return value


class _Request(_WireModel):
    image: str = Field(
        description="http(s) URL, data: URI, blob:sha256:<hex> (see producer.blobs), or an absolute path "
        "under a worker's allowed roots"
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="seconds the job may take on the worker (capped by job_timeout)",
    )

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str) -> str:
        kind = image_kind(value)
        if kind == "blob":
            blob_digest(value)  # a malformed reference is refused here, not at the store
        if kind is not None:
            return value
        scheme = value.split(":", 1)[0] if ":" in value[:16] else ""
        hint = f"scheme {scheme!r} is not supported" if scheme else "not a URL, data: URI or absolute path"
        raise ValueError(
            f"image must be an http(s) URL, a data: URI, a blob reference or an absolute path ({hint})"
        )


class CaptionRequest(_Request):
    """Describe an image. ``prompt`` defaults to ``DEFAULT_CAPTION_PROMPT``."""

    prompt: Text | None = None
    generation: GenerationParams = GenerationParams()


class VQARequest(_Request):
    """Answer ``question`` about an image."""

    question: Text
    generation: GenerationParams = GenerationParams()


class ClassifyRequest(_Request):
    """Score ``labels`` for an image, or (no labels) answer ``DEFAULT_CLASSIFY_PROMPT`` (or ``prompt``).

    Exclusive mode (default): the labels are answers to ``prompt`` + "Answer with one of: <labels>.";
    ``logprob(label)`` = the sum of the log-probabilities of the label's tokens and of the chat template's
    end-of-turn token, tokenized in context (the whole conversation at once), i.e. log P(the answer is
    exactly ``label``); ``scores`` = the softmax of those over the labels: P(label | one of the labels).

    Multi-label mode (``multi_label=True``): each label on its own, asked ``question`` (default
    ``DEFAULT_LABEL_QUESTION``, ``{label}`` replaced); score = P("Yes") / (P("Yes") + P("No")), each answer's
    probability as above; ``labels`` in the result = those scoring at or above ``threshold`` (one number,
    or one per label; labels not in the dict use ``DEFAULT_THRESHOLD``).
    """

    labels: list[Label] | None = Field(default=None, min_length=1, max_length=MAX_LABELS)
    prompt: Text | None = None
    multi_label: bool = Field(default=False, description="score each label independently (yes/no)")
    threshold: Probability | dict[Label, Probability] = Field(
        default=DEFAULT_THRESHOLD, description="multi-label: a label is given at or above it (0 to 1)"
    )
    question: Text | None = Field(default=None, description="multi-label: per-label question with {label}")
    generation: GenerationParams = GenerationParams()

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyRequest:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if not self.multi_label:
            given = sorted({"threshold", "question"} & self.model_fields_set)
            if given:
                raise ValueError(f"{', '.join(given)}: only with multi_label=true")
            return self
        if not self.labels:
            raise ValueError("multi_label needs labels")
        if self.prompt is not None:
            raise ValueError(
                "multi_label asks a question per label: give question (with {label}), not prompt"
            )
        if self.question is not None and "{label}" not in self.question:
            raise ValueError("question must contain {label}")
        unknown = sorted(set(self.threshold) - set(self.labels)) if isinstance(self.threshold, dict) else []
        if unknown:
            raise ValueError(f"threshold names labels not in labels: {', '.join(unknown)}")
        return self

    def threshold_of(self, label: str) -> float:
        """The threshold ``label`` is given at (multi-label mode)."""
        if isinstance(self.threshold, dict):
            return self.threshold.get(label, DEFAULT_THRESHOLD)
        return self.threshold


class Timings(_Model):
    """Where the job's time went on the worker, in milliseconds, and the batch it ran in."""

    queued_ms: float | None = Field(default=None, description="sent to started, if the producer stamped it")
    image_ms: float = Field(description="fetch + decode")
    preprocess_ms: float = Field(default=0.0, description="processor: image tiles + tokens (job's thread)")
    batch_wait_ms: float = Field(default=0.0, description="waiting for the model thread / batch to form")
    inference_ms: float = Field(description="the model call of its batch")
    total_ms: float = Field(description="task start to result")
    batch_size: int = Field(default=1, ge=1, description="jobs in the model call")


class _Result(_Model):
    model: str = Field(description="the checkpoint that answered")
    worker: str = Field(description="Celery node name of the worker")
    prompt_tokens: int = Field(ge=0, description="prompt tokens, image tokens included")
    image_tokens: int = Field(ge=0)
    generated_tokens: int = Field(ge=0)
    timings: Timings


class CaptionResult(_Result):
    kind: Literal["caption"] = "caption"
    text: str


class VQAResult(_Result):
    kind: Literal["vqa"] = "vqa"
    text: str


class ClassifyResult(_Result):
    kind: Literal["classify"] = "classify"
    label: str = Field(description="the top-scoring label (without labels: the model's free-text answer)")
    scores: dict[str, float] | None = Field(
        default=None,
        description="exclusive: P(label | one of the labels), summing to 1; multi-label: P(Yes) / (P(Yes) + "
        "P(No)) per label, in [0, 1]; None without labels",
    )
    logprobs: dict[str, float] | None = Field(
        default=None,
        description="exclusive: log P(the answer is exactly the label); multi-label: log P(the answer to the "
        "label's question is exactly Yes); None without labels",
    )
    labels: list[str] | None = Field(
        default=None, description="multi-label: the labels at or above their threshold, in request order"
    )


Request = CaptionRequest | VQARequest | ClassifyRequest
Result = CaptionResult | VQAResult | ClassifyResult

REQUEST_MODELS: dict[str, type[CaptionRequest] | type[VQARequest] | type[ClassifyRequest]] = {
    TASK_CAPTION: CaptionRequest,
    TASK_VQA: VQARequest,
    TASK_CLASSIFY: ClassifyRequest,
}
RESULT_MODELS: dict[str, type[CaptionResult] | type[VQAResult] | type[ClassifyResult]] = {
    TASK_CAPTION: CaptionResult,
    TASK_VQA: VQAResult,
    TASK_CLASSIFY: ClassifyResult,
}


def validation_message(exc: ValidationError) -> str:
    """A request's validation errors, one per problem: ``field: what is wrong`` (never the input value)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
