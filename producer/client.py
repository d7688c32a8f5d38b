"""``LlavaClient``: submit LLaVA-NeXT jobs by task name and collect typed results.

Torch-free: imports Celery, pydantic and the contract only; tasks are sent by name (``send_task``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from celery import Celery, states
from pydantic import BaseModel, ValidationError

from producer.app import attempt_timeout, backend_client, create_celery_app
from producer.blobs import BlobStore, RedisBlobStore, bytes_packer
from producer.broker import broker_guard
from producer.collector import aiter_completed, iter_completed
from producer.contract import (
    BLOB_PREFIX,
    CLAIM_HEADER,
    RESULT_MODELS,
    SENT_AT_HEADER,
    TASK_CAPTION,
    TASK_CLASSIFY,
    TASK_VQA,
    CaptionRequest,
    CaptionResult,
    ClassifyRequest,
    ClassifyResult,
    VQARequest,
    VQAResult,
    blob_digest,
    validation_message,
)
from producer.errors import (
    BrokerUnavailable,
    InvalidRequest,
)
from producer.images import ImageInput, data_uri, describe, image_source, redact
from producer.job import Job
from producer.memory_policy import evicting_redis, eviction_message
from producer.options import SendOptions
from producer.settings import ClientSettings, load_settings
from producer.transport import ResultBackend

log = logging.getLogger(__name__)


def _refused_connection(exc: BaseException) -> bool:
    """Whether ``exc`` came of a connection the broker refused: nothing was sent, so nothing landed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# kind -> (task name, request model, the request fields passed by name)
KINDS: dict[str, tuple[str, type[BaseModel], tuple[str, ...]]] = {
    "caption": (TASK_CAPTION, CaptionRequest, ("prompt",)),
    "vqa": (TASK_VQA, VQARequest, ("question",)),
    "classify": (
        TASK_CLASSIFY,
        ClassifyRequest,
        ("labels", "prompt", "multi_label", "threshold", "question"),
    ),
}


class LlavaClient:
    """Submit caption, VQA and classify jobs. Every method returns a :class:`Job` at once.

    Images: an http(s) URL (fetched by the worker), a ``data:`` URI, a local file as a
    :class:`~pathlib.Path` (a ``str`` is never read as a path), ``bytes`` or a PIL image (sent inline as a
    ``data:`` URI, checked against ``max_image_bytes`` first).

    When Redis does not answer, sending and reading results raise
    :class:`~producer.errors.BrokerUnavailable` within about ``broker_timeout`` seconds; the same client
    works again once Redis is back. A send that a full Redis refuses raises
    :class:`~producer.errors.BrokerFull` (retryable). After its first send, a client warns once (a
    ``logging`` warning) if its Redis evicts keys when full (:mod:`producer.memory_policy`).
    """

    def __init__(self, settings: ClientSettings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or load_settings(ClientSettings)
        self.app = app or create_celery_app(
            self.settings, role="producer", broker_timeout=self.settings.broker_timeout
        )
        self._policy_checked = False
        self._policy_lock = threading.Lock()

    def caption(self, image: ImageInput, prompt: str | None = None, **options: Any) -> Job[CaptionResult]:
        """Describe ``image`` (``prompt`` defaults to ``DEFAULT_CAPTION_PROMPT`` of :mod:`producer.contract`).

        ``options``: where and how to send it (:class:`SendOptions`: ``model``, ``queue``, ``priority``,
        ``job_id``, ``timeout_s``, ``on_success``, ``on_error``, ``callback_queue``) and decoding
        (``max_new_tokens``, ``temperature``, ``top_p``).
        """
        return self._submit(TASK_CAPTION, CaptionRequest, image, {"prompt": prompt}, options)

    def vqa(self, image: ImageInput, question: str, **options: Any) -> Job[VQAResult]:
        """Answer ``question`` about ``image``. ``options`` as for :meth:`caption`."""
        return self._submit(TASK_VQA, VQARequest, image, {"question": question}, options)

    def classify(
        self,
        image: ImageInput,
        labels: list[str] | None = None,
        prompt: str | None = None,
        *,
        multi_label: bool = False,
        threshold: float | dict[str, float] | None = None,
        question: str | None = None,
        **options: Any,
    ) -> Job[ClassifyResult]:
        """Pick the most likely of ``labels`` (``scores``: probabilities over them); without labels, the
        model's free-text class as ``label``. ``multi_label=True``: each label scored on its own (P(yes) to
        ``question``, default ``DEFAULT_LABEL_QUESTION``), the result's ``labels`` those at or above
        ``threshold`` (default ``DEFAULT_THRESHOLD``; a dict gives one per label). ``options`` as for
        :meth:`caption`. See :class:`~producer.contract.ClassifyRequest` for the formulas and defaults."""
        fields: dict[str, Any] = {"labels": labels, "prompt": prompt, "multi_label": multi_label or None}
        fields |= {"threshold": threshold, "question": question}
        return self._submit(TASK_CLASSIFY, ClassifyRequest, image, fields, options)

    def submit(self, kind: str, image: ImageInput, **params: Any) -> Job[Any]:
        """One job of ``kind`` (``caption``, ``vqa``, ``classify`` or its task name ``llava.<kind>``);
        ``params``: ``prompt``, ``question``, ``labels``, ``multi_label``, ``threshold`` as the kind takes
        them, and the options of :meth:`caption`."""
        task_name, model, names = _kind(kind)
        fields = {name: params.pop(name, None) for name in names}
        return self._submit(task_name, model, image, fields, params)

    def map(self, kind: str, images: Iterable[ImageInput], **params: Any) -> list[Job[Any]]:
        """:meth:`submit` one job per image with the same ``params``; the jobs in input order.

        ``job_id`` is refused (ids must differ). An image that cannot be sent (unreadable file, too large)
        raises its error; the jobs sent before it still run.
        """
        if params.get("job_id") is not None:
            raise InvalidRequest("map() sends many jobs: job_id cannot be shared; use submit() per image")
        _kind(kind)
        return [self.submit(kind, image, **params) for image in images]

    def job(self, job_id: str, task_name: str | None = None) -> Job[Any]:
        """Rebuild a handle from a job id (e.g. in a later web request). Without ``task_name`` the result
        model is chosen by the result's ``kind``."""
        if task_name is not None and task_name not in RESULT_MODELS:
            raise InvalidRequest(f"unknown task {task_name!r}; expected one of {sorted(RESULT_MODELS)}")
        if not isinstance(job_id, str) or not job_id.strip():
            raise InvalidRequest(f"a job id must be a non-empty string, not {job_id!r}")
        model = RESULT_MODELS[task_name] if task_name else None
        return Job(self.app.AsyncResult(job_id), model, self.settings.result_timeout, task_name)

    def as_completed(self, jobs: Iterable[Job[Any]], timeout: float | None = None) -> Iterator[Job[Any]]:
        """Yield each job as soon as it finished, succeeded or failed (``job.get()`` then returns or raises
        at once), like :func:`concurrent.futures.as_completed`.

        Waits on the result backend's pub/sub channel (no polling on Redis). Raises
        :class:`~producer.errors.ResultTimeout` if jobs are left after ``timeout`` seconds in all (default:
        the ``result_timeout`` setting). Jobs not yet finished when the iteration stops (timeout, ``break``)
        are released: no subscription outlives it.
        """
        jobs = list(jobs)
        try:
            with broker_guard("waiting for results"):
                yield from iter_completed(jobs, self._wait(timeout))
        except BrokerUnavailable:
            _forget_subscriptions(jobs)
            raise

    def as_completed_async(
        self, jobs: Iterable[Job[Any]], timeout: float | None = None
    ) -> AsyncIterator[Job[Any]]:
        """:meth:`as_completed` for asyncio (``async for job in ...``): one executor thread waits for all
        the jobs, the event loop runs on."""
        jobs = list(jobs)
        return _guarded(aiter_completed(jobs, self._wait(timeout)), jobs)

    def _wait(self, timeout: float | None) -> float:
        return self.settings.result_timeout if timeout is None else timeout

    def _submit(
        self, task_name: str, model: type[BaseModel], image: ImageInput, fields: dict[str, Any], options: dict
    ) -> Job[Any]:
        """Validate and send. With ``job_id``: if a job with that id already succeeded (and its result has
        not expired), its handle is returned and nothing is sent; otherwise the job is sent under that id (a
        stored failure is forgotten first, so the handle waits for the new run), and a worker that finds a
        stored success for it returns that instead of running it again."""
        send, generation = SendOptions.split(options)
        source = image_source(image, self.settings.max_image_bytes)
        request = _request(model, source if isinstance(source, str) else "data:,", fields, send, generation)
        result_model = RESULT_MODELS[task_name]
        timeout = self.settings.result_timeout
        if send.job_id is not None:
            existing = self._succeeded(send.job_id, task_name)
            if existing is not None:
                return existing
        job_id = send.job_id or str(uuid.uuid4())
        claim = uuid.uuid4().hex  # this send's claim on its image: a resend under job_id makes its own
        wire_image, shown_image = self._wire_image(source, claim)
        payload = request.model_dump(mode="json", exclude_defaults=True) | {"image": wire_image}
        shown = {**payload, "image": shown_image}
        headers = _message_headers(wire_image, claim)
        with self._release_blob_on_failure(wire_image, claim), broker_guard(f"sending a {task_name} job"):
            async_result = self.app.send_task(
                task_name,
                task_id=job_id,
                kwargs={"request": payload},
                queue=send.queue_name(self.settings.default_queue),
                priority=send.wire_priority(self.app),
                kwargsrepr=repr({"request": shown}),
                headers=headers,
                link=send.callback(self.app, send.on_success),
                link_error=send.callback(self.app, send.on_error),
            )
        self._warn_if_redis_evicts()
        job: Job[Any] = Job(async_result, result_model, timeout, task_name)
        # Subscribe to the result only while something waits (get/wait/as_completed subscribe, then read the
        # result): a web request that answers 202 never waits. Our Redis backend does not subscribe on send
        # (producer.transport); Celery's own backends do, so their subscription is released here.
        if not isinstance(self.app.backend, ResultBackend):
            job.release()
        return job

    def _wire_image(self, source: str | bytes, claim: str) -> tuple[str, str]:
        """(the request's ``image``, its redacted form): a URL as it is; inline bytes stored in the blob store
        under their hash (once, however many jobs use them) or, below ``blob_min_bytes`` or without a store,
        a data: URI."""
        if isinstance(source, str):
            return source, redact(source)
        store = self.blob_store
        if store is None or len(source) < self.settings.blob_min_bytes:
            return data_uri(source), describe(source)
        with broker_guard("storing the image in the blob store"):
            reference = store.put(source, claim)
        return reference, describe(source, sha256=blob_digest(reference))  # the image is hashed once

    @contextlib.contextmanager
    def _release_blob_on_failure(self, wire_image: str, claim: str) -> Iterator[None]:
        """If the block raises after the image was stored under ``claim``, drop the claim (best effort, never
        raising: with Redis down the release fails too, and the blob's TTL cleans it up). Not after a
        publish that Redis did not answer, unless it refused the connection: it may have landed (a primary
        that took the push and died, or hung, before replying), and its job would then find its image gone;
        the TTL cleans up instead."""
        try:
            yield
        except BrokerUnavailable as exc:
            if not _refused_connection(exc):
                raise
            self._release_quietly(wire_image, claim)
            raise
        except Exception:  # an interrupt leaves the claim to the TTL rather than wait on Redis
            self._release_quietly(wire_image, claim)
            raise

    def _release_quietly(self, wire_image: str, claim: str) -> None:
        store = self.blob_store
        if store is not None and wire_image.startswith(BLOB_PREFIX):
            with contextlib.suppress(Exception):  # Redis down: the blob's TTL deletes it
                store.release(wire_image, claim)

    def _warn_if_redis_evicts(self) -> None:
        """Once per client, after a send went through: warn if its Redis may drop accepted jobs when full (an
        evicting ``maxmemory-policy``). Later sends skip it, whatever it found (a Redis that would not say
        leaves a debug line)."""
        with self._policy_lock:
            if self._policy_checked:
                return
            self._policy_checked = True
        evicting = evicting_redis(self.app, attempt_timeout(self.settings.broker_timeout))
        if evicting:
            log.warning("llava-queue: %s", eviction_message(evicting))

    @functools.cached_property
    def blob_store(self) -> BlobStore | None:
        """Where inline images wait for their jobs: the result-backend Redis, or None (``blob_store: off``,
        or a result backend that is not Redis: images then travel in the message)."""
        backend = self.app.backend  # the effective one: CELERY_RESULT_BACKEND may override our setting
        if self.settings.blob_store == "off" or not hasattr(backend, "connparams"):
            return None
        # One attempt, no retries: a connect of at most ``a`` (producer.app.attempt_timeout), then commands
        # of at most ``broker_timeout - a`` (the time a large image may need to be written), so a put on a
        # dead or hung Redis ends within broker_timeout. Sentinel and TLS as the backend has them.
        attempt = attempt_timeout(self.settings.broker_timeout)
        client = backend_client(
            backend,
            self.settings.broker_timeout - attempt,
            connect_timeout=attempt,
            command_packer=bytes_packer(),  # the image's bytes go to the socket uncopied
        )
        return RedisBlobStore(client, ttl=self.settings.result_expires)

    def _succeeded(self, job_id: str, task_name: str) -> Job[Any] | None:
        """The handle of job ``job_id`` if it already succeeded. A stored failure is forgotten: the job runs
        again, and its handle must wait for the new outcome, not return the old one."""
        existing: Job[Any] = Job(
            self.app.AsyncResult(job_id), RESULT_MODELS[task_name], self.settings.result_timeout, task_name
        )
        state = existing.state
        if state == states.SUCCESS:
            return existing
        if state == states.FAILURE:
            with broker_guard(f"forgetting the failure of job {job_id}"):
                existing.async_result.forget()
        return None

    def close(self) -> None:
        """Release broker and backend connections."""
        self.app.close()


async def _guarded(completed: AsyncIterator[Job[Any]], jobs: list[Job[Any]]) -> AsyncIterator[Job[Any]]:
    try:
        with broker_guard("waiting for results"):
            async for job in completed:
                yield job
    except BrokerUnavailable:
        _forget_subscriptions(jobs)
        raise


def _forget_subscriptions(jobs: list[Job[Any]]) -> None:
    for job in jobs:
        job.forget_subscription()


def _message_headers(wire_image: str, claim: str) -> dict[str, Any]:
    """A job message's headers: when it was sent, and, with a blob image, the send's claim on it (the worker
    releases that claim when the job ends)."""
    headers: dict[str, Any] = {SENT_AT_HEADER: time.time()}
    if wire_image.startswith(BLOB_PREFIX):
        headers[CLAIM_HEADER] = claim
    return headers


def check_params(kind: str, **params: Any) -> None:
    """Raise :class:`InvalidRequest` if ``params`` (fields and options, as for :meth:`LlavaClient.submit`)
    are not valid for ``kind``, before any image is read or sent."""
    _, model, names = _kind(kind)
    fields = {name: params.pop(name, None) for name in names}
    send, generation = SendOptions.split(params)
    _request(model, "data:,", fields, send, generation)


def _request(
    model: type[BaseModel], image: str, fields: dict[str, Any], send: SendOptions, generation: dict[str, Any]
) -> BaseModel:
    """The request model, or an :class:`InvalidRequest` naming every problem."""
    values = {**fields, "timeout_s": send.timeout_s, "generation": generation}
    try:
        return model(image=image, **{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc)) from None


def _kind(kind: str) -> tuple[str, type[BaseModel], tuple[str, ...]]:
    name = kind.removeprefix("llava.") if isinstance(kind, str) else ""
    if name not in KINDS:
        raise InvalidRequest(f"unknown job kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[name]
