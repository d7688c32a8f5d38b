"""The prefix cache: keys (image digest + prompt ids up to the last image token), LRU within its budget."""

from __future__ import annotations

import torch

from worker.runtime.model import Prepared
from worker.runtime.prefix import PrefixCache

IMAGE = 9


def prepared(ids: list[int], digest: str = "abc") -> Prepared:
    pixels, size = torch.zeros(1, 3, 2, 2), torch.tensor([2, 2])
    return Prepared(torch.tensor(ids), pixels, size, ids.count(IMAGE), image_digest=digest)


def kv(tokens: int, value: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, tokens, 4), value), torch.full((1, 2, tokens, 4), value)) for _ in range(3)]


def test_the_key_is_the_digest_and_the_ids_up_to_the_last_image_token() -> None:
    cache = PrefixCache(100)
    key, length = cache.key(prepared([1, 2, IMAGE, IMAGE, 5, 6]), IMAGE) or (None, 0)
    assert key == ("abc", (1, 2, IMAGE, IMAGE)) and length == 4
    assert cache.key(prepared([1, 2, IMAGE, IMAGE, 7]), IMAGE) == (key, 4)  # another question, same key


def test_no_key_when_off_without_a_digest_an_image_or_a_suffix() -> None:
    assert PrefixCache(0).key(prepared([1, IMAGE, 5]), IMAGE) is None
    assert PrefixCache(100).key(prepared([1, IMAGE, 5], digest=""), IMAGE) is None
    assert PrefixCache(100).key(prepared([1, 2, 5]), IMAGE) is None
    assert PrefixCache(100).key(prepared([1, IMAGE]), IMAGE) is None  # a row needs a token of its own
    assert PrefixCache(2).key(prepared([1, 2, IMAGE, 5]), IMAGE) is None  # over the whole budget


def test_least_recently_used_entries_leave_to_stay_within_the_budget() -> None:
    cache = PrefixCache(10)
    cache.put("a", 4, kv(4))
    cache.put("b", 4, kv(4))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", 4, kv(4))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.tokens == 8 and (cache.hits, cache.misses) == (3, 1)


def test_entries_own_their_storage() -> None:
    cache, layers = PrefixCache(10), kv(4, 1.0)
    cache.put("a", 4, layers)
    layers[0][0].fill_(7.0)  # the row's cache changes or goes: the entry does not
    stored = cache.get("a")
    assert stored is not None and float(stored[0][0].max()) == 1.0
