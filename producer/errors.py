"""The one error tree of llava-queue, shared by producer and worker.

Every error a user can get is a :class:`LlavaError` with a stable ``code`` string and a human message.
``retryable`` marks the transient ones (:data:`RETRYABLE_CODES`): the same job sent again later may succeed
(a fetch, a deadline, a lost worker, an unreachable or full Redis). The worker retries a transient fetch
failure itself (an instance may say otherwise: an HTTP 404 is a permanent ``fetch_failed``);
``llava-queue``'s resume sends jobs whose last error is transient again. Permanent errors are never retried.

On the wire (Celery's JSON result backend) a failed job is stored as
``{"exc_type": "InvalidImage", "exc_module": "producer.errors", "exc_message": [MESSAGE, CODE]}``, so a client
that does not import this module can still read the code from ``exc_message[1]``.
"""

from __future__ import annotations


class LlavaError(Exception):
    """Base of every llava-queue error. ``code`` is stable; ``message`` is for humans."""

    code = "llava_error"
    retryable = False

    def __init__(self, message: str = "", *_wire: object, retryable: bool | None = None) -> None:
        # ``_wire`` swallows the code that travels beside the message in exc_message (see module docstring).
        self.message = message or (self.__doc__ or self.code).strip().splitlines()[0]
        if retryable is not None:
            self.retryable = retryable
        super().__init__(self.message, self.code)

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        """The error as JSON-ready data: ``{"code": ..., "message": ...}``."""
        return {"code": self.code, "message": self.message}


class InvalidRequest(LlavaError):
    """The request is malformed or breaks a limit."""

    code = "invalid_request"


class ImageError(LlavaError):
    """The image could not be used."""

    code = "image_error"


class InvalidImage(ImageError):
    """The image bytes or reference could not be decoded."""

    code = "invalid_image"


class ImageTooLarge(ImageError):
    """The image is over a byte or pixel cap."""

    code = "image_too_large"


class FetchForbidden(ImageError):
    """The image URL or path is not allowed."""

    code = "fetch_forbidden"


class FetchFailed(ImageError):
    """The image URL could not be fetched (after retries)."""

    code = "fetch_failed"
    retryable = True


class ResourceExhausted(LlavaError):
    """The worker ran out of memory for this job."""

    code = "resource_exhausted"


class BrokerFull(ResourceExhausted):
    """Redis (the broker, the result backend or the blob store) is out of memory: it refused the send.

    Raised by a send whose message or image Redis would not store: used memory is at ``maxmemory`` and the
    policy is ``noeviction``, which refuses new writes rather than dropping queued jobs. Retryable: a refused
    write stores nothing (the publish is one command, the image's claim and bytes one transaction, and an
    image stored before a refused publish is released), so sending again cannot run the job twice; and a
    full Redis frees memory by itself as workers take queued jobs, release their images and results expire.
    If it stays full, give Redis more memory or fewer queued jobs.
    """

    code = "broker_full"
    retryable = True


class JobTimeout(LlavaError, TimeoutError):
    """The job ran past its deadline on the worker."""

    code = "timeout"
    retryable = True


class WorkerLost(LlavaError):
    """The worker died while running the job, more times than the redelivery cap allows."""

    code = "worker_lost"
    retryable = True


class InternalError(LlavaError):
    """The worker failed in an unexpected way (details are in the worker's log)."""

    code = "internal_error"


class ResultTimeout(LlavaError, TimeoutError):
    """No result arrived within the time the caller waited; the job may still finish."""

    code = "result_timeout"
    retryable = True


class BrokerUnavailable(LlavaError):
    """Redis (the broker or the result backend) did not answer within ``broker_timeout``; retry later."""

    code = "broker_unavailable"
    retryable = True


ERRORS: dict[str, type[LlavaError]] = {
    cls.code: cls
    for cls in (
        LlavaError,
        InvalidRequest,
        ImageError,
        InvalidImage,
        ImageTooLarge,
        FetchForbidden,
        FetchFailed,
        ResourceExhausted,
        BrokerFull,
        JobTimeout,
        WorkerLost,
        InternalError,
        ResultTimeout,
        BrokerUnavailable,
    )
}


RETRYABLE_CODES = frozenset(code for code, cls in ERRORS.items() if cls.retryable)


def error_from_code(code: str, message: str) -> LlavaError:
    """Rebuild the typed error for a wire ``code`` (unknown codes become :class:`InternalError`)."""
    return ERRORS.get(code, InternalError)(message)
