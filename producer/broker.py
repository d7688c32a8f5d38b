"""An unreachable Redis (broker or result backend) becomes one typed error: :class:`BrokerUnavailable`; a
full one (``maxmemory`` reached under ``noeviction``) another: :class:`BrokerFull`.

Celery, kombu and redis-py each report it their own way: kombu's ``OperationalError`` (publish, control),
redis-py's ``ConnectionError``/``TimeoutError`` (result reads), and a ``RuntimeError`` from Celery's result
consumer when its pub/sub connection cannot be re-established. How long each waits is set by the producer's
Celery configuration (:func:`producer.app.fail_fast_config`); this module only names the failure. Redis's
``OOM`` refusal arrives as redis-py's ``OutOfMemoryError``, raw from the blob store and wrapped in kombu's
``OperationalError`` from a publish: it is found anywhere in the chain.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import redis.exceptions
from celery.backends.asynchronous import E_RETRY_LIMIT_EXCEEDED
from kombu.exceptions import OperationalError

from producer.errors import BrokerFull, BrokerUnavailable, LlavaError

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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised from, Redis refusing a write for want of memory."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # a chain may loop back on itself
        if isinstance(cause, redis.exceptions.OutOfMemoryError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def broker_guard(what: str) -> Iterator[None]:
    """Re-raise a Redis failure in the block as a typed error ("``what``: ..."): a refused write for want of
    memory as :class:`BrokerFull`, a connection failure as :class:`BrokerUnavailable`."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LlavaError):
            raise
        if is_out_of_memory(exc):
            raise BrokerFull(
                f"{what}: Redis is out of memory (its used memory reached maxmemory and it refused the "
                "write): the job was not sent; send it again once workers have drained the queue, or give "
                "Redis more memory (maxmemory)"
            ) from exc
        if not is_connection_error(exc):
            raise
        cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ else exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise BrokerUnavailable(f"{what}: Redis did not answer ({reason})") from exc
