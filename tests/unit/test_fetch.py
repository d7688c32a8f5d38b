"""The SSRF guard in ``worker.fetch``: block list, odd IPv4 spellings, allow list and resolver failures.

No network and no DNS: names are resolved by stub resolvers; the real ``system_resolver`` is only given
numeric host spellings, which the C library turns into addresses without asking DNS.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

import pytest

from producer.errors import FetchFailed, FetchForbidden, JobTimeout
from worker.fetch import FetchAborted, FetchBudget, FetchRegistry, fetch
from worker.fetch_policy import FetchPolicy, Resolver, blocked_reason, checked_addresses, system_resolver
from worker.settings import WorkerSettings


def policy_for(allow: list[str], **settings: Any) -> FetchPolicy:
    """The fetch policy of a worker with these settings and ``fetch_allow=allow``."""
    return FetchPolicy.from_settings(WorkerSettings(fetch_allow=allow, **settings))


EMPTY = policy_for([], max_image_bytes=1024)

BLOCKED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback-top"),
    ("10.1.2.3", "rfc1918-10"),
    ("172.16.0.1", "rfc1918-172-low"),
    ("172.31.255.255", "rfc1918-172-high"),
    ("192.168.1.1", "rfc1918-192"),
    ("169.254.169.254", "cloud-metadata"),
    ("100.64.0.1", "cgnat"),
    ("0.0.0.0", "unspecified-v4"),
    ("224.0.0.1", "multicast-v4"),
    ("239.255.255.250", "multicast-ssdp"),
    ("240.0.0.1", "reserved-240"),
    ("255.255.255.255", "broadcast"),
    ("192.0.2.1", "documentation"),
    ("::", "unspecified-v6"),
    ("::1", "loopback-v6"),
    ("fe80::1", "link-local-v6"),
    ("fc00::1", "unique-local-fc"),
    ("fd12:3456::1", "unique-local-fd"),
    ("ff02::1", "multicast-v6"),
    ("::ffff:127.0.0.1", "v4-mapped-loopback"),
    ("::ffff:10.0.0.1", "v4-mapped-private"),
    ("2002:7f00:1::", "6to4-loopback"),
    ("64:ff9b::a00:1", "nat64-private"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "teredo-loopback"),
]

PUBLIC = [
    ("8.8.8.8", "google-dns"),
    ("1.1.1.1", "cloudflare-dns"),
    ("93.184.216.34", "example-com"),
    ("2606:4700:4700::1111", "cloudflare-v6"),
    ("::ffff:8.8.8.8", "v4-mapped-public"),
    ("64:ff9b::808:808", "nat64-public"),
]

ODD_LOOPBACK_SPELLINGS = ["2130706433", "127.1", "0x7f.1", "0177.0.0.1", "0x7f000001"]


def stub(*answer: str, calls: list[tuple[str, int]] | None = None) -> Resolver:
    """A resolver that answers ``answer`` for any host (recording each call in ``calls``)."""

    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        return list(answer)

    return resolve


def raising(exc: BaseException) -> Resolver:
    """A resolver that fails with ``exc``."""

    def resolve(host: str, port: int) -> list[str]:
        raise exc

    return resolve


@pytest.mark.parametrize("address", [a for a, _ in BLOCKED], ids=[i for _, i in BLOCKED])
def test_blocked_addresses_have_a_reason(address: str) -> None:
    reason = blocked_reason(ipaddress.ip_address(address))
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("address", [a for a, _ in PUBLIC], ids=[i for _, i in PUBLIC])
def test_public_addresses_are_not_blocked(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", [a for a, _ in BLOCKED], ids=[i for _, i in BLOCKED])
def test_blocked_answer_is_refused(address: str) -> None:
    with pytest.raises(FetchForbidden) as info:
        checked_addresses("images.example", 443, EMPTY, stub(address))
    assert info.value.code == "fetch_forbidden"


@pytest.mark.parametrize("address", [a for a, _ in PUBLIC], ids=[i for _, i in PUBLIC])
def test_public_answer_is_returned(address: str) -> None:
    assert checked_addresses("images.example", 443, EMPTY, stub(address)) == [ipaddress.ip_address(address)]


@pytest.mark.parametrize("spelling", ODD_LOOPBACK_SPELLINGS)
def test_system_resolver_normalises_odd_ipv4_spellings(spelling: str) -> None:
    assert system_resolver(spelling, 80) == ["127.0.0.1"]


@pytest.mark.parametrize("spelling", ODD_LOOPBACK_SPELLINGS)
def test_odd_ipv4_spellings_are_refused(spelling: str) -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses(spelling, 80, EMPTY, system_resolver)


def test_ipv6_loopback_literal_is_refused() -> None:
    # urlsplit(...).hostname strips the brackets, so the guard sees the bare literal "::1".
    assert system_resolver("::1", 80) == ["::1"]
    with pytest.raises(FetchForbidden):
        checked_addresses("::1", 80, EMPTY, system_resolver)


def test_ipv4_mapped_literal_is_refused() -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses("::ffff:127.0.0.1", 80, EMPTY, system_resolver)


def test_scoped_link_local_answer_is_refused() -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses("printer.example", 80, EMPTY, stub("fe80::1%eth0"))


def test_resolver_gets_host_and_port() -> None:
    calls: list[tuple[str, int]] = []
    checked_addresses("images.example", 8443, EMPTY, stub("8.8.8.8", calls=calls))
    assert calls == [("images.example", 8443)]


def test_one_private_address_among_public_ones_is_refused() -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses("images.example", 443, EMPTY, stub("93.184.216.34", "10.0.0.5"))
    with pytest.raises(FetchForbidden):
        checked_addresses("images.example", 443, EMPTY, stub("10.0.0.5", "93.184.216.34"))


def test_all_public_answers_are_returned_in_order() -> None:
    answer = ["93.184.216.34", "2606:4700:4700::1111", "8.8.8.8"]
    result = checked_addresses("images.example", 443, EMPTY, stub(*answer))
    assert result == [ipaddress.ip_address(a) for a in answer]
    assert all(isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address) for a in result)


def test_forbidden_message_hides_the_address_and_names_the_setting() -> None:
    with pytest.raises(FetchForbidden) as info:
        checked_addresses("intranet.example", 443, EMPTY, stub("93.184.216.34", "10.0.0.5"))
    for text in (str(info.value), info.value.message, repr(info.value)):
        assert "10.0.0.5" not in text
    assert "LLAVA_FETCH_ALLOW" in info.value.message


@pytest.fixture
def allowing() -> FetchPolicy:
    return policy_for(["127.0.0.1/32", "internal.example", "10.0.0.0/8"], max_image_bytes=1024)


def test_allow_list_is_split_into_hosts_and_networks(allowing: FetchPolicy) -> None:
    assert allowing.max_bytes == 1024
    assert allowing.allow_hosts == frozenset({"internal.example"})
    assert set(allowing.allow_networks) == {
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
    }


def test_allow_list_cidr_32_allows_exactly_one_address(allowing: FetchPolicy) -> None:
    assert allowing.allows(ipaddress.ip_address("127.0.0.1"))
    assert not allowing.allows(ipaddress.ip_address("127.0.0.2"))
    assert checked_addresses("dev.example", 80, allowing, stub("127.0.0.1")) == [
        ipaddress.ip_address("127.0.0.1")
    ]
    with pytest.raises(FetchForbidden):
        checked_addresses("dev.example", 80, allowing, stub("127.0.0.2"))


def test_allow_list_cidr_allows_only_its_range(allowing: FetchPolicy) -> None:
    assert allowing.allows(ipaddress.ip_address("10.200.3.4"))
    assert not allowing.allows(ipaddress.ip_address("192.168.1.1"))
    assert not allowing.allows(ipaddress.ip_address("11.0.0.1"))
    assert checked_addresses("svc.example", 80, allowing, stub("10.200.3.4")) == [
        ipaddress.ip_address("10.200.3.4")
    ]
    for outside in ("192.168.1.1", "172.16.0.1", "169.254.169.254"):
        with pytest.raises(FetchForbidden):
            checked_addresses("svc.example", 80, allowing, stub(outside))


def test_allow_list_mixed_answer_with_one_blocked_address_is_refused(allowing: FetchPolicy) -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses("svc.example", 80, allowing, stub("10.0.0.5", "192.168.0.5"))


def test_allow_list_cidr_address_with_public_ones_is_returned(allowing: FetchPolicy) -> None:
    result = checked_addresses("svc.example", 80, allowing, stub("10.0.0.5", "8.8.8.8"))
    assert result == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("8.8.8.8")]


@pytest.mark.parametrize("host", ["internal.example", "INTERNAL.Example", "internal.example."])
def test_allow_listed_host_may_resolve_anywhere(allowing: FetchPolicy, host: str) -> None:
    answer = ["169.254.169.254", "192.168.9.9", "::1"]
    result = checked_addresses(host, 80, allowing, stub(*answer))
    assert result == [ipaddress.ip_address(a) for a in answer]


def test_allow_listed_host_name_entry_is_normalised() -> None:
    policy = policy_for(["Internal.Example."], max_image_bytes=1024)
    assert policy.allow_hosts == frozenset({"internal.example"})
    assert checked_addresses("internal.example", 80, policy, stub("10.0.0.1"))


@pytest.mark.parametrize(
    "host", ["evil.internal.example", "internal.example.attacker.test", "xinternal.example"]
)
def test_allow_listed_host_does_not_cover_other_names(allowing: FetchPolicy, host: str) -> None:
    with pytest.raises(FetchForbidden):
        checked_addresses(host, 80, allowing, stub("192.168.9.9"))


def test_unknown_name_is_a_permanent_failure() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(FetchFailed) as info:
        checked_addresses("nope.example", 443, EMPTY, raising(error))
    assert info.value.code == "fetch_failed"
    assert info.value.retryable is False


def test_temporary_dns_failure_is_retryable() -> None:
    error = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
    with pytest.raises(FetchFailed) as info:
        checked_addresses("flaky.example", 443, EMPTY, raising(error))
    assert info.value.code == "fetch_failed"
    assert info.value.retryable is True


def test_empty_answer_is_a_failure() -> None:
    with pytest.raises(FetchFailed) as info:
        checked_addresses("void.example", 443, EMPTY, stub())
    assert info.value.code == "fetch_failed"
    assert info.value.retryable is False


def test_empty_answer_fails_even_for_allow_listed_host(allowing: FetchPolicy) -> None:
    with pytest.raises(FetchFailed):
        checked_addresses("internal.example", 443, allowing, stub())


@pytest.mark.parametrize(
    "error",
    [OSError("resolver exploded"), UnicodeError("label too long")],
    ids=["os-error", "unicode-error"],
)
def test_other_resolver_errors_are_permanent_failures(error: Exception) -> None:
    with pytest.raises(FetchFailed) as info:
        checked_addresses("odd.example", 443, EMPTY, raising(error))
    assert info.value.retryable is False


def test_garbage_answer_is_a_permanent_failure() -> None:
    with pytest.raises(FetchFailed) as info:
        checked_addresses("odd.example", 443, EMPTY, stub("not-an-address"))
    assert info.value.retryable is False


# -- one wall-clock budget per fetch (FetchBudget, FetchRegistry) -----------------------------------------


def test_an_ended_budget_fails_the_fetch_with_the_limit_it_hit() -> None:
    budget = FetchBudget(60)
    budget.check("https://example.com/a.png")  # time left: nothing raised
    budget.end()
    with pytest.raises(FetchFailed) as error:
        budget.check("https://user:secret@example.com/a.png?sig=1")
    assert "60 s (fetch_deadline)" in error.value.message and "secret" not in error.value.message


def test_a_budget_capped_by_the_job_deadline_ends_as_a_job_timeout() -> None:
    budget = FetchBudget(0, limit="job deadline")
    with pytest.raises(JobTimeout) as error:
        budget.check("https://example.com/a.png")
    assert error.value.code == "timeout"


def test_fetch_with_its_job_deadline_already_past_never_resolves() -> None:
    asked: list[str] = []
    with pytest.raises(JobTimeout):
        fetch(
            "https://example.com/a.png", EMPTY, lambda host, port: asked.append(host) or [], time.monotonic()
        )
    assert asked == []


def test_an_aborted_budget_raises_fetch_aborted_not_a_coded_error() -> None:
    budget = FetchBudget(60)
    budget.end(aborted=True)
    with pytest.raises(FetchAborted):
        budget.check("https://example.com/a.png")


def test_the_watchdog_wakes_a_blocked_read_when_the_budget_ends() -> None:
    ours, theirs = socket.socketpair()  # the peer never writes: recv would block for ever
    read: list[bytes] = []
    with ours, theirs, FetchBudget(0.2) as budget:
        budget.track(ours)
        reader = threading.Thread(target=lambda: read.append(ours.recv(1)))
        reader.start()
        reader.join(30)
        assert not reader.is_alive() and read == [b""]  # shut down: end of stream at once
        assert budget.expired and not budget.aborted


def test_a_socket_tracked_after_the_end_is_shut_down_at_once() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        budget = FetchBudget(60)
        budget.end()
        budget.track(ours)
        assert ours.recv(1) == b""


def test_a_backoff_pause_wakes_when_the_fetch_is_aborted() -> None:
    budget = FetchBudget(60)
    pausing = threading.Thread(target=budget.pause, args=(50,))
    pausing.start()
    budget.end(aborted=True)
    pausing.join(30)
    assert not pausing.is_alive() and budget.aborted


def test_a_pause_never_outlasts_the_budget() -> None:
    with FetchBudget(0.1) as budget:
        pausing = threading.Thread(target=budget.pause, args=(50,))
        pausing.start()
        pausing.join(30)
        assert not pausing.is_alive()


def test_registry_abort_ends_running_budgets_and_refuses_new_fetches() -> None:
    registry = FetchRegistry()
    running = FetchBudget(60)
    registry.enter(running)
    assert registry.abort() == 1 and running.aborted
    with pytest.raises(FetchAborted):
        registry.enter(FetchBudget(60))
    with pytest.raises(FetchAborted):
        fetch("https://example.com/a.png", EMPTY, lambda host, port: ["93.184.216.34"], registry=registry)
