"""An unreachable Redis (broker or result backend) becomes one typed error: :class:`BrokerUnavailable`.

Celery, kombu and redis-py each report it their own way: kombu's ``OperationalError`` (publish, control),
redis-py's ``ConnectionError``/``TimeoutError`` (result reads), and a ``RuntimeError`` from Celery's result
consumer when its pub/sub connection cannot be re-established. How long each waits is set by the producer's
Celery configuration (:func:`producer.app.fail_fast_config`); this module only names the failure.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import redis.exceptions
from celery.backends.asynchronous import E_RETRY_LIMIT_EXCEEDED
from kombu.exceptions import OperationalError

from producer.errors import BrokerUnavailable, LlavaError

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    socket.timeout,
)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says that Redis could not be reached (not that a job failed)."""
    if isinstance(exc, LlavaError):
        return False
    if isinstance(exc, RuntimeError):
        return str(exc).strip() == E_RETRY_LIMIT_EXCEEDED.strip()
    return isinstance(exc, CONNECTION_ERRORS)


@contextlib.contextmanager
def broker_guard(what: str) -> Iterator[None]:
    """Re-raise a Redis connection failure in the block as :class:`BrokerUnavailable` ("``what``: ...")."""
    try:
        yield
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ else exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise BrokerUnavailable(f"{what}: Redis did not answer ({reason})") from exc
