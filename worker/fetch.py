"""Fetch image URLs that web users supply, without becoming a proxy into the cluster's network.

- http and https only; every address the host resolves to is checked against a block list
  (:mod:`worker.fetch_policy`: the block list, the allow list ``LLAVA_FETCH_ALLOW`` and the limits).
- The connection goes to the address that was checked (urllib3 pool on the IP, ``Host`` header and TLS SNI /
  certificate check on the name): no second DNS lookup between check and connect (no DNS rebinding).
- Redirects are followed by hand, each hop resolved and checked again, up to ``fetch_max_redirects``.
- One wall-clock budget per fetch (:class:`FetchBudget`): DNS, connect, TLS, headers, redirects, body, retries
  and backoff pauses all end by ``fetch_deadline`` or the job's own deadline, whichever comes first; a
  watchdog shuts the socket down when it is spent, and a warm shutdown aborts running fetches
  (:class:`FetchRegistry`). The body is streamed with a byte cap (a too-large ``Content-Length`` is refused
  before reading).
- Transient failures (connection errors, timeouts, 5xx, 408, 429) are retried with exponential backoff,
  up to ``fetch_retries`` times while the budget lasts; every other failure is permanent.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError, SSLError

from producer.contract import redact_url
from producer.errors import FetchFailed, ImageTooLarge, InvalidRequest, JobTimeout
from worker.fetch_policy import FetchPolicy, IPAddress, Resolver, checked_addresses, system_resolver

log = logging.getLogger(__name__)

_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 429}
_CHUNK = 64 * 1024
_AGENT = "llava-queue"


class FetchAborted(Exception):
    """The worker shut down while this fetch was running (not the job's fault: it goes back to the queue)."""


class FetchRegistry:
    """The fetches running in one worker, so that a warm shutdown can cut them short (:meth:`abort`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[FetchBudget] = set()
        self._closed = False
        self._aborted = threading.Event()

    def abort(self) -> int:
        """End every running fetch (and every later one, and every :meth:`pause`) with :class:`FetchAborted`;
        returns how many fetches ran."""
        self._aborted.set()
        with self._lock:
            self._closed, running = True, list(self._running)
        for budget in running:
            budget.end(aborted=True)
        return len(running)

    def enter(self, budget: FetchBudget) -> None:
        with self._lock:
            if self._closed:
                raise FetchAborted("the worker is shutting down")
            self._running.add(budget)

    def leave(self, budget: FetchBudget) -> None:
        with self._lock:
            self._running.discard(budget)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` between two tries of an image read (a blob store that did not answer), or until
        :meth:`abort`, which raises :class:`FetchAborted`: a warm shutdown never waits on the pause."""
        if self._aborted.wait(seconds):
            raise FetchAborted("the worker is shutting down")


class FetchBudget:
    """One wall-clock budget for a whole fetch: DNS, connect, TLS, headers, redirects, body, retries, pauses.

    Why a watchdog and not per-recv timeouts: http.client reads the status line and headers with one socket
    timeout per ``recv``, so a server sending a byte every few seconds is never cut off by it, and urllib3
    cannot re-arm it between header bytes. When the budget ends (or the worker aborts its fetches), a timer
    shuts down every socket of this fetch (``shutdown(SHUT_RDWR)``): whatever blocks on it (headers, body,
    plain or TLS) returns at once; the fetch then sees :meth:`check` fail. Per-read and connect timeouts are
    still set, to the smaller of ``fetch_timeout`` and what is left (the TLS handshake is bounded by the
    connect timeout as a whole, see ``_WatchedHTTPSConnection``).
    """

    def __init__(self, seconds: float, limit: str = "fetch_deadline") -> None:
        self.seconds, self.limit = max(0.0, seconds), limit
        self.ends = time.monotonic() + self.seconds
        self.expired = self.aborted = False
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(self.seconds, self.end)
        self._timer.daemon = True

    def __enter__(self) -> FetchBudget:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def end(self, aborted: bool = False) -> None:
        """The budget is spent (timer) or the fetch is aborted: shut every socket down now."""
        with self._lock:
            self.aborted = self.aborted or aborted
            self.expired = self.expired or not aborted
            self._ended.set()
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def track(self, sock: socket.socket) -> None:
        """Watch a newly connected socket (shut it down at once if the budget already ended)."""
        with self._lock:
            if not self._ended.is_set():
                self._sockets.append(sock)
                return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def pause(self, seconds: float) -> None:
        """Sleep, waking early if the budget ends or the fetch is aborted."""
        self._ended.wait(min(seconds, self.remaining()))

    def check(self, url: str) -> None:
        """Raise if the worker aborted the fetch or the budget is spent (nothing read after that counts)."""
        if self.aborted:
            raise FetchAborted("the worker shut down during the fetch")
        if self.expired or self.remaining() <= 0:
            if self.limit == "fetch_deadline":
                raise FetchFailed(f"fetching {redact_url(url)} took over {self.seconds:g} s (fetch_deadline)")
            raise JobTimeout(f"the job's deadline passed while fetching {redact_url(url)}")


def fetch(
    url: str,
    policy: FetchPolicy,
    resolve: Resolver = system_resolver,
    deadline: float | None = None,
    registry: FetchRegistry | None = None,
) -> bytes:
    """The body of ``url``, retrying transient failures with exponential backoff, all within one budget:
    ``policy.deadline`` seconds, or less if the job's ``deadline`` (``time.monotonic()``) comes first."""
    seconds, limit = policy.deadline, "fetch_deadline"
    if deadline is not None and deadline - time.monotonic() < seconds:
        seconds, limit = deadline - time.monotonic(), "job deadline"
    budget = FetchBudget(seconds, limit)
    registry = registry or FetchRegistry()
    registry.enter(budget)
    try:
        with budget:
            return _fetch_with_retries(url, policy, resolve, budget)
    finally:
        registry.leave(budget)


def _fetch_with_retries(url: str, policy: FetchPolicy, resolve: Resolver, budget: FetchBudget) -> bytes:
    for attempt in range(policy.retries + 1):
        try:
            return _fetch_following_redirects(url, policy, resolve, budget)
        except FetchFailed as exc:
            budget.check(url)  # a failure caused by the watchdog is the budget's, not the server's
            pause = policy.backoff * 2**attempt
            if not exc.retryable or attempt == policy.retries or pause >= budget.remaining():
                raise
            log.debug("fetch of %s failed (%s); retry %d in %.2f s", redact_url(url), exc, attempt + 1, pause)
            budget.pause(pause)
            budget.check(url)
    raise AssertionError("unreachable")


def _fetch_following_redirects(
    url: str, policy: FetchPolicy, resolve: Resolver, budget: FetchBudget
) -> bytes:
    for _ in range(policy.max_redirects + 1):
        budget.check(url)
        pool, response = _request(url, policy, resolve, budget)
        try:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                url = _redirect_target(url, location)
                continue
            return _read_body(url, response, policy, budget)
        finally:
            response.close()  # never drain: the body may be endless
            pool.close()
    raise FetchFailed(f"more than {policy.max_redirects} redirects (fetch_max_redirects)", retryable=False)


def _redirect_target(url: str, location: str) -> str:
    try:
        target = urljoin(url, location)
        urlsplit(target).port  # noqa: B018  # raises ValueError on a bad port
    except ValueError:
        raise FetchFailed(f"{redact_url(url)} redirects to an unparsable URL", retryable=False) from None
    return target


def _split(url: str) -> tuple[SplitResult, int]:
    """Parts and port of ``url``; a URL that cannot be parsed is the request's fault."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidRequest(f"the image URL cannot be parsed ({exc}): {redact_url(url)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"only http(s) URLs with a host can be fetched, not {redact_url(url)}")
    return parts, port


def _resolve_within(
    host: str, port: int, policy: FetchPolicy, resolve: Resolver, budget: FetchBudget
) -> list[IPAddress]:
    """``checked_addresses`` in a helper thread, so a hanging DNS server cannot outlast the budget."""
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(checked_addresses(host, port, policy, resolve))
        except BaseException as exc:  # handed to the fetching thread below
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="llava-dns", daemon=True)
    thread.start()
    thread.join(budget.remaining())
    if not outcome:
        budget.end()
        raise FetchFailed(f"resolving {host!r} took longer than the fetch's budget")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    addresses: list[IPAddress] = outcome[0]
    return addresses


def _request(
    url: str, policy: FetchPolicy, resolve: Resolver, budget: FetchBudget
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    parts, port = _split(url)
    host = parts.hostname or ""
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    last_error: Exception | None = None
    for address in _resolve_within(host, port, policy, resolve, budget):
        budget.check(url)
        pool = _pool(parts.scheme, str(address), port, host, policy, budget)
        try:
            return pool, pool.urlopen(
                "GET",
                path,
                headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "User-Agent": _AGENT},
                redirect=False,
                retries=False,
                preload_content=False,
            )
        except SSLError as exc:
            pool.close()
            budget.check(url)
            raise FetchFailed(f"TLS error fetching {redact_url(url)}: {exc}", retryable=False) from None
        except (HTTPError, ValueError) as exc:  # ValueError: http.client refuses a malformed path or header
            pool.close()
            budget.check(url)
            if isinstance(exc, ValueError):
                raise InvalidRequest(f"the image URL cannot be requested: {redact_url(url)}") from None
            last_error = exc  # try the next checked address
    raise FetchFailed(f"cannot connect to {redact_url(url)}: {type(last_error).__name__}")


class _WatchedHTTPConnection(HTTPConnection):
    """A connection whose socket the fetch's budget watches from the moment it is connected."""

    def __init__(self, *args: Any, budget: FetchBudget, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._budget = budget

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._budget.track(sock)  # before the TLS handshake, which a slow server could also drip
        return sock


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    """The same for https, where two sockets are watched: ``ssl`` *detaches* the raw socket tracked by
    ``_new_conn`` when it wraps it (its ``shutdown`` then fails with EBADF, which :meth:`FetchBudget.end`
    ignores), so the TLS socket is tracked too once connected: headers and body read from it. The handshake in
    between is one ``ssl`` call that CPython bounds as a whole by the connect timeout (at most what is left
    of the budget), so a server dripping it cannot outlast the budget either."""

    def connect(self) -> None:
        super().connect()
        self._budget.track(self.sock)  # shut down at once if the budget ended during the handshake


def _pool(
    scheme: str, ip: str, port: int, host: str, policy: FetchPolicy, budget: FetchBudget
) -> urllib3.HTTPConnectionPool:
    step = max(0.001, min(policy.timeout, budget.remaining()))
    timeout = urllib3.Timeout(connect=step, read=step)  # per step; the whole fetch is bounded by the budget
    if scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            ip,
            port,
            timeout=timeout,
            maxsize=1,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="REQUIRED",
            budget=budget,
        )
        pool.ConnectionCls = _WatchedHTTPSConnection
        return pool
    pool = urllib3.HTTPConnectionPool(ip, port, timeout=timeout, maxsize=1, budget=budget)
    pool.ConnectionCls = _WatchedHTTPConnection
    return pool


def _read_body(
    url: str, response: urllib3.BaseHTTPResponse, policy: FetchPolicy, budget: FetchBudget
) -> bytes:
    shown = redact_url(url)
    if response.status >= 400:
        transient = response.status >= 500 or response.status in _TRANSIENT_STATUS
        raise FetchFailed(f"fetching {shown} returned HTTP {response.status}", retryable=transient)
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageTooLarge(
            f"{shown} is {length} bytes, over the {policy.max_bytes}-byte cap (max_image_bytes)"
        )
    chunks, size = [], 0
    try:
        while chunk := response.read1(_CHUNK):
            size += len(chunk)
            if size > policy.max_bytes:
                raise ImageTooLarge(f"{shown} is over the {policy.max_bytes}-byte cap (max_image_bytes)")
            budget.check(url)
            chunks.append(chunk)
    except HTTPError as exc:
        budget.check(url)
        raise FetchFailed(f"fetching {shown} failed while reading: {type(exc).__name__}") from None
    budget.check(url)  # a body cut short by the watchdog is not the image
    return b"".join(chunks)
