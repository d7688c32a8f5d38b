"""What a worker's image fetches may reach, and their limits (:class:`FetchPolicy`): the SSRF guard of
:mod:`worker.fetch`.

Every address a host resolves to is checked against a block list (loopback, private, link-local incl.
169.254.169.254, CGNAT, multicast, reserved, unspecified, IPv6 unique- and link-local, and IPv4 addresses
embedded in IPv6 such as ``::ffff:127.0.0.1``); odd IPv4 spellings (``2130706433``, ``127.1``, ``0x7f.1``)
are normalised by the resolver before the check. ``LLAVA_FETCH_ALLOW`` (hosts and CIDRs) lets operators
reach internal hosts on purpose.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

from producer.errors import FetchFailed, FetchForbidden
from worker.settings import WorkerSettings, settings_group

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
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
    """Limits and the allow list for one worker, built from its settings (:meth:`from_settings`: the
    ``fetch_*`` settings and ``max_image_bytes`` hold the values and their defaults)."""

    max_bytes: int
    timeout: float
    deadline: float  # the whole fetch: every attempt, redirect and pause
    max_redirects: int
    retries: int
    backoff: float
    allow_hosts: frozenset[str]
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> FetchPolicy:
        hosts, networks = set(), []
        for entry in settings.fetch_allow:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return settings_group(
            cls,
            settings,
            "fetch_",
            max_bytes=settings.max_image_bytes,
            allow_hosts=frozenset(hosts),
            allow_networks=tuple(networks),
        )

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
