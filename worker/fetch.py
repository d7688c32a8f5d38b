"""Fetch image URLs that web users supply, without becoming a proxy into the cluster's network.

- http and https only; every address the host resolves to is checked against a block list (loopback,
  private, link-local incl. 169.254.169.254, CGNAT, multicast, reserved, unspecified, IPv6 unique- and
  link-local, and IPv4 addresses embedded in IPv6 such as ``::ffff:127.0.0.1``); odd IPv4 spellings
  (``2130706433``, ``127.1``, ``0x7f.1``) are normalised by the resolver before the check.
- The connection goes to the address that was checked (urllib3 pool on the IP, ``Host`` header and TLS SNI /
  certificate check on the name): no second DNS lookup between check and connect (no DNS rebinding).
- Redirects are followed by hand, each hop resolved and checked again, up to ``fetch_max_redirects``.
- Connect/read timeouts per socket operation and a total deadline per attempt; the body is streamed with a
  byte cap (a too-large ``Content-Length`` is refused before reading).
- Transient failures (connection errors, timeouts, 5xx, 408, 429) are retried with exponential backoff,
  up to ``fetch_retries`` times; every other failure is permanent.
``LLAVA_FETCH_ALLOW`` (hosts and CIDRs) lets operators reach internal hosts on purpose.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import HTTPError, SSLError

from producer.errors import FetchFailed, FetchForbidden, ImageTooLarge, InvalidRequest
from producer.images import redact_url

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
_REDIRECTS = {301, 302, 303, 307, 308}
_TRANSIENT_STATUS = {408, 429}
_CHUNK = 64 * 1024
_AGENT = "llava-queue"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched from, or None if it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = blocked_reason(embedded)
            return f"embedded IPv4 {reason}" if reason else None
    for reason in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(address, f"is_{reason}"):
            return reason.replace("_", "-")
    if not address.is_global:
        return "not globally routable"  # e.g. CGNAT 100.64.0.0/10, documentation ranges
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the C resolver also normalises ``127.1``-style spellings)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and the allow list for one worker (built from its settings)."""

    max_bytes: int
    timeout: float = 5.0
    deadline: float = 15.0
    max_redirects: int = 3
    retries: int = 2
    backoff: float = 0.5
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_allow_list(cls, entries: list[str], **limits: float | int) -> FetchPolicy:
        hosts, networks = set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(allow_hosts=frozenset(hosts), allow_networks=tuple(networks), **limits)  # type: ignore[arg-type]

    def allows(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allow_networks)


def checked_addresses(host: str, port: int, policy: FetchPolicy, resolve: Resolver) -> list[IPAddress]:
    """Resolve ``host`` and check every address; raise :class:`FetchForbidden` if any is blocked."""
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except socket.gaierror as exc:
        transient = exc.errno == socket.EAI_AGAIN
        raise FetchFailed(f"cannot resolve host {host!r}: {exc.strerror}", retryable=transient) from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise FetchFailed(f"cannot resolve host {host!r}: {exc}", retryable=False) from None
    if not addresses:
        raise FetchFailed(f"host {host!r} has no addresses", retryable=False)
    if host.lower().rstrip(".") in policy.allow_hosts:
        return addresses
    for address in addresses:
        reason = blocked_reason(address)
        if reason and not policy.allows(address):
            raise FetchForbidden(
                f"host {host!r} resolves to a blocked address ({reason}); operators can allow it with "
                "LLAVA_FETCH_ALLOW"
            )
    return addresses


def fetch(url: str, policy: FetchPolicy, resolve: Resolver = system_resolver) -> bytes:
    """The body of ``url``, retrying transient failures with exponential backoff."""
    for attempt in range(policy.retries + 1):
        try:
            return _fetch_following_redirects(url, policy, resolve)
        except FetchFailed as exc:
            if not exc.retryable or attempt == policy.retries:
                raise
            pause = policy.backoff * 2**attempt
            log.debug("fetch of %s failed (%s); retry %d in %.2f s", redact_url(url), exc, attempt + 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _fetch_following_redirects(url: str, policy: FetchPolicy, resolve: Resolver) -> bytes:
    for _ in range(policy.max_redirects + 1):
        response = _request(url, policy, resolve)
        try:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            return _read_body(url, response, policy)
        finally:
            response.close()  # never drain: the body may be endless
    raise FetchFailed(f"more than {policy.max_redirects} redirects (fetch_max_redirects)", retryable=False)


def _request(url: str, policy: FetchPolicy, resolve: Resolver) -> urllib3.BaseHTTPResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"only http(s) URLs with a host can be fetched, not {redact_url(url)}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest(f"bad port in {redact_url(url)}") from None
    host = parts.hostname
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    last_error: Exception | None = None
    for address in checked_addresses(host, port, policy, resolve):
        pool = _pool(parts.scheme, str(address), port, host, policy)
        try:
            return pool.urlopen(
                "GET",
                path,
                headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "User-Agent": _AGENT},
                redirect=False,
                retries=False,
                preload_content=False,
            )
        except SSLError as exc:
            raise FetchFailed(f"TLS error fetching {redact_url(url)}: {exc}", retryable=False) from None
        except HTTPError as exc:
            last_error = exc  # try the next checked address
    raise FetchFailed(f"cannot connect to {redact_url(url)}: {type(last_error).__name__}")


def _pool(scheme: str, ip: str, port: int, host: str, policy: FetchPolicy) -> urllib3.HTTPConnectionPool:
    # total bounds connect + headers; the body is bounded by fetch_deadline in _read_body.
    timeout = urllib3.Timeout(connect=policy.timeout, read=policy.timeout, total=policy.deadline)
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(
            ip,
            port,
            timeout=timeout,
            maxsize=1,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="REQUIRED",
        )
    return urllib3.HTTPConnectionPool(ip, port, timeout=timeout, maxsize=1)


def _read_body(url: str, response: urllib3.BaseHTTPResponse, policy: FetchPolicy) -> bytes:
    shown = redact_url(url)
    if response.status >= 400:
        transient = response.status >= 500 or response.status in _TRANSIENT_STATUS
        raise FetchFailed(f"fetching {shown} returned HTTP {response.status}", retryable=transient)
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise ImageTooLarge(
            f"{shown} is {length} bytes, over the {policy.max_bytes}-byte cap (max_image_bytes)"
        )
    deadline = time.monotonic() + policy.deadline
    chunks, size = [], 0
    try:
        while chunk := response.read1(_CHUNK):
            size += len(chunk)
            if size > policy.max_bytes:
                raise ImageTooLarge(f"{shown} is over the {policy.max_bytes}-byte cap (max_image_bytes)")
            if time.monotonic() > deadline:
                raise FetchFailed(f"fetching {shown} took over {policy.deadline:g} s (fetch_deadline)")
            chunks.append(chunk)
    except HTTPError as exc:
        raise FetchFailed(f"fetching {shown} failed while reading: {type(exc).__name__}") from None
    return b"".join(chunks)
