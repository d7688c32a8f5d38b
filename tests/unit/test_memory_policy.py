"""Which Redis memory policies keep accepted jobs (producer.memory_policy): pure judgements, no Redis."""

from __future__ import annotations

import pytest

from producer.memory_policy import SAFE_POLICY, MemoryPolicy, eviction_message

EVICTING = ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu", "volatile-random"]


@pytest.mark.parametrize("policy", [*EVICTING, "volatile-ttl"])
def test_every_policy_but_noeviction_evicts_under_a_memory_cap(policy: str) -> None:
    assert MemoryPolicy(policy, maxmemory=24 << 20).evicts


@pytest.mark.parametrize("policy", [*EVICTING, SAFE_POLICY])
def test_without_a_memory_cap_nothing_is_evicted(policy: str) -> None:
    assert not MemoryPolicy(policy, maxmemory=0).evicts


def test_noeviction_is_safe_under_a_cap() -> None:
    assert SAFE_POLICY == "noeviction" and not MemoryPolicy("noeviction", maxmemory=24 << 20).evicts


def test_the_message_names_each_redis_its_policy_and_the_fix() -> None:
    message = eviction_message(
        {"broker": MemoryPolicy("volatile-lru", 1000), "result backend": MemoryPolicy("allkeys-lfu", 2000)}
    )
    assert "broker: maxmemory-policy volatile-lru, maxmemory 1000 bytes" in message
    assert "result backend: maxmemory-policy allkeys-lfu, maxmemory 2000 bytes" in message
    assert "set maxmemory-policy noeviction" in message and "broker_full" in message
