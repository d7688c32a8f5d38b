"""The blob store's memory of the digests it stored lately: bounded, least recent dropped, a TTL's age."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from producer.blobs import RecentDigests


def test_fresh_only_within_the_ttl() -> None:
    recent = RecentDigests(ttl=600)
    assert not recent.fresh("a", now=0.0)
    recent.note("a", at=100.0)
    assert recent.fresh("a", now=699.9)
    assert not recent.fresh("a", now=700.0)  # its keys have expired by now
    recent.note("a", at=650.0)  # claimed again: the TTLs started anew
    assert recent.fresh("a", now=1000.0)


def test_bounded_least_recent_dropped_first() -> None:
    recent = RecentDigests(ttl=600, size=2)
    recent.note("a", at=1.0)
    recent.note("b", at=2.0)
    recent.note("a", at=3.0)  # a is now the most recent
    recent.note("c", at=4.0)
    assert [recent.fresh(d, now=5.0) for d in "abc"] == [True, False, True]


def test_threads_share_one_bounded_memory() -> None:
    recent = RecentDigests(ttl=600, size=100)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: recent.note(f"d{i}", at=0.0), range(2000)))
    assert sum(recent.fresh(f"d{i}", now=1.0) for i in range(2000)) == 100
