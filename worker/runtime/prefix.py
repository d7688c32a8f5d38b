"""Prefix reuse for the continuous engine: jobs on the same image share the KV of the prompt up to and
including the image's tokens, so a second job prefills only its own question.

Keyed by the image's digest (:attr:`Prepared.image_digest`) and the prompt's token ids up to the last image
token: the KV of a causal prefix depends on nothing after it. LRU within a budget in KV tokens
(``prefix_cache_tokens``), which the engine sets aside from its KV budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.runtime.model import Prepared

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, tokens, head_dim)


class PrefixCache:
    """KV of image prefixes, least recently used first out, holding at most ``capacity`` tokens."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tokens = 0  # held now
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[int, Layers]] = OrderedDict()

    def key(self, prepared: Prepared, image_token_id: int) -> tuple[Hashable, int] | None:
        """The cache key of a prompt's image prefix and that prefix's length; None when the cache is off,
        the prompt has no digest or no image, or the prefix would be the whole prompt (a row needs at least
        one token of its own to prefill, for its first logits)."""
        if not self.capacity or not prepared.image_digest:
            return None
        ids = prepared.input_ids.tolist()
        images = [index for index, token in enumerate(ids) if token == image_token_id]
        length = images[-1] + 1 if images else 0
        if not length or length >= len(ids) or length > self.capacity:
            return None
        return (prepared.image_digest, tuple(ids[:length])), length

    def get(self, key: Hashable) -> Layers | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, length: int, layers: Layers) -> None:
        """Keep ``layers`` (their own storage: the caller's cache may grow or be freed) under ``key``,
        dropping the least recently used entries until it fits."""
        if key in self._entries or length > self.capacity:
            return
        while self.tokens + length > self.capacity:
            _, (dropped, _) = self._entries.popitem(last=False)
            self.tokens -= dropped
        self._entries[key] = (length, [(keys.clone(), values.clone()) for keys, values in layers])
        self.tokens += length

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0
