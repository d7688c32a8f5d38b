"""Step-level decoding for the continuous-batching engine: one left-padded ``DynamicCache`` of running rows.

A new row is prefilled alone (no padding), in one or several chunks into its own cache (:class:`Pending`),
then joins the running batch: the narrower of
the two caches is left-padded to the other's width and the two are concatenated along the batch. Each
decode step feeds every row's last token with its own position (the count of its real tokens) and a mask
that hides the padding. A row that ends leaves at once: its cache rows are dropped by index and the columns
that only held padding are cut, so its KV memory is given back before the next step. Decode steps write
into spare columns (:class:`GrowingLayer`, 32 at a time) instead of concatenating the whole cache each step
as ``DynamicLayer`` does: a decode step of 8 rows x ~2.5k tokens went from ~17.5 to ~8-11 ms on this CPU.

Why this and not a preallocated static cache with per-row positions: with the same padded footprint it needs
no scatter kernels and keeps transformers' fast causal SDPA path for the prefill; the decode step's cost on
CPU is the forward, not the cache copy (see bench/serving.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from producer.errors import InternalError

if TYPE_CHECKING:
    from worker.runtime.model import Prepared, Sampling


@dataclass(eq=False)
class Row:
    """One generating job in the decode batch: its prompt, its own sampling, the tokens it has so far."""

    prepared: Prepared
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    ended: bool = False  # end of sequence, its own max_new_tokens, or its failure
    failure: InternalError | None = None  # set: it ended without an answer (see :func:`advance`)

    @property
    def length(self) -> int:
        """Tokens this row holds in the KV cache (its prompt and every generated token but the last)."""
        return self.prepared.prompt_tokens + len(self.tokens) - 1


@dataclass(eq=False)
class Pending:
    """A row whose prompt is being prefilled, chunk by chunk, into its own cache (batch 1, no padding).
    ``embeds``: the prompt's input embeddings (image features merged) from token ``start`` on, set by the
    first chunk (after a prefix-cache hit ``start`` is the cached prefix's length); ``done``: tokens in
    ``cache``."""

    prepared: Prepared
    sampling: Sampling
    cache: DynamicCache
    embeds: torch.Tensor | None = None  # (1, prompt_tokens - start, hidden)
    start: int = 0
    done: int = 0
    prefix_key: Hashable | None = None  # where to store the image's prefix once prefilled (None: nowhere)
    prefix_length: int = 0

    @property
    def left(self) -> int:
        """Prompt tokens still to prefill."""
        return self.prepared.prompt_tokens - self.done


class FilledLayer(Protocol):
    """A cache layer holding tokens, as the engine uses it: a ``DynamicLayer`` of a language model's
    ``DynamicCache`` once prefilled (see :func:`filled_layers`)."""

    keys: torch.Tensor
    values: torch.Tensor


class _BatchLayer(FilledLayer, Protocol):
    """A layer of the decode batch's cache: a :class:`GrowingLayer` (made so by :meth:`DecodeBatch.join`)."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None


def filled_layers(cache: DynamicCache) -> list[FilledLayer]:
    """``cache``'s layers, each holding keys and values. transformers types ``Cache.layers`` as any kind of
    layer (linear-attention and placeholder ones too) with keys and values ``None`` until the first update;
    a LLaVA language model's prefilled ``DynamicCache`` holds only filled ``DynamicLayer``s."""
    return cast("list[FilledLayer]", cache.layers)


class GrowingLayer(DynamicLayer):
    """A cache layer whose decode steps write into spare columns of a buffer (reallocated ``SPARE``
    columns at a time) instead of concatenating the whole cache every step as ``DynamicLayer`` does."""

    SPARE = 32
    keys: torch.Tensor | None  # DynamicLayer's (declared here: mypy reads transformers as Any)
    values: torch.Tensor | None
    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values with spare columns

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys is None or self.values is None:
            return super().update(key_states, value_states, *args, **kwargs)
        used, adding = self.keys.shape[-2], key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or not _prefix_of(self.keys, buffers[0]) or used + adding > buffers[0].shape[-2]:
            buffers = self._buffers = (_grown(self.keys, used + adding), _grown(self.values, used + adding))
        buffers[0][:, :, used : used + adding] = key_states
        buffers[1][:, :, used : used + adding] = value_states
        self.keys, self.values = buffers[0][:, :, : used + adding], buffers[1][:, :, : used + adding]
        return self.keys, self.values


def _prefix_of(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``view`` is ``buffer[:, :, :n]`` (so the next columns of ``buffer`` are free to write)."""
    return (
        view.data_ptr() == buffer.data_ptr()
        and view.shape[:2] == buffer.shape[:2]
        and view.stride() == buffer.stride()
    )


def _grown(tensor: torch.Tensor, needed: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[-2] = needed + GrowingLayer.SPARE
    buffer = tensor.new_empty(shape)
    buffer[:, :, : tensor.shape[-2]] = tensor
    return buffer


class DecodeBatch:
    """The running rows and their KV cache (left-padded, ``mask`` 1 where a column holds a real token)."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, width), long

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def kv_tokens(self) -> int:
        """Token positions the cache holds now, padding included (rows x width)."""
        return len(self.rows) * self.width

    def join(self, row: Row, cache: DynamicCache) -> None:
        """Append a row prefilled alone (its cache: batch 1, no padding)."""
        mask = torch.ones((1, _cache_width(cache)), dtype=torch.long, device=_cache_device(cache))
        if self.cache is None or self.mask is None:
            for layer in cache.layers:
                layer.__class__ = GrowingLayer  # same state; only ``update`` differs
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(self.width, mask.shape[1])
        for mine, theirs in zip(_batch_layers(self.cache), filled_layers(cache), strict=True):
            mine._buffers = None  # the old buffers go now, not at the next step
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows.append(row)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at ``keep`` (others leave, their KV freed), then cut all-padding columns."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(list(keep), device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask.index_select(0, index)
        cut = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        self.mask = mask[:, cut:]
        for layer in _batch_layers(self.cache):
            layer._buffers = None  # the departed rows' KV is freed now
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]

    def undo_step(self) -> None:
        """After a failed decode step: cut the column it may have added to the mask and to some layers
        (the cache is consistent again; before a step the width is always the longest row's length)."""
        if self.mask is None or self.cache is None:
            return
        width = max(row.length for row in self.rows)
        self.mask = self.mask[:, :width]
        for layer in filled_layers(self.cache):
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def step_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs of one decode step: each row's last token at its own position, the mask grown by one."""
        assert self.mask is not None
        device = self.mask.device
        last = torch.tensor([[row.tokens[-1]] for row in self.rows], device=device)
        positions = torch.tensor([[row.length] for row in self.rows], device=device)
        grown = torch.ones((len(self.rows), 1), dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, grown], dim=1)
        return {"input_ids": last, "position_ids": positions, "attention_mask": self.mask}


def pick(row: Row, logits: torch.Tensor) -> int:
    """The row's next token from its last logits (1-D): greedy, or temperature / top-p sampling with the
    row's own generator. Raises :class:`~producer.errors.InternalError` when the logits are not finite (NaN
    or +inf: the model's numbers overflowed for this row)."""
    logits = logits.float()
    top = logits.max()  # NaN anywhere makes it NaN
    if not bool(torch.isfinite(top)):
        raise InternalError("the model's output for this job is not finite (NaN or infinite logits)")
    if row.sampling.temperature <= 0:
        return int(logits.argmax())
    # Shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf (probability
    # 0) instead of overflowing to +inf, whose softmax is NaN; floored at float32's smallest normal number,
    # below which the divisor itself would round to 0.
    temperature = max(row.sampling.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits - top) / temperature, dim=-1)
    if row.sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > row.sampling.top_p
        probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=row.generator))


def advance(row: Row, logits: torch.Tensor, eos_ids: set[int]) -> None:
    """Give the row its next token; it ends at an end-of-sequence token or its own ``max_new_tokens``. Logits
    that are not finite end this row alone, its failure kept in ``row.failure`` (its batch goes on)."""
    try:
        token = pick(row, logits)
    except InternalError as exc:
        row.failure, row.ended = exc, True
        return
    row.tokens.append(token)
    row.ended = token in eos_ids or len(row.tokens) >= row.sampling.max_new_tokens


def merge_left_padded(caches: Sequence[DynamicCache]) -> DynamicCache:
    """One cache of the caches' rows (each prefilled alone), every one left-padded with zeros to the widest.
    Consumes ``caches``: each layer is dropped once merged, so the peak is the merged cache plus one layer."""
    if len(caches) == 1:
        return caches[0]
    width = max(_cache_width(cache) for cache in caches)
    merged = DynamicCache()
    for index in range(len(caches[0].layers)):
        layers = [filled_layers(cache)[index] for cache in caches]
        keys = torch.cat([_pad_left(layer.keys, width) for layer in layers])
        values = torch.cat([_pad_left(layer.values, width) for layer in layers])
        for cache in caches:
            source = cache.layers[index]
            assert isinstance(source, DynamicLayer)
            source.keys = source.values = None
        merged.update(keys, values, index)
    return merged


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis (dim 2 of a KV tensor, dim 1 of a mask) with zeros to ``width``."""
    axis = 2 if tensor.dim() == 4 else 1
    pad = width - tensor.shape[axis]
    if pad == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = pad
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _batch_layers(cache: DynamicCache) -> list[_BatchLayer]:
    return cast("list[_BatchLayer]", cache.layers)  # mypy cannot follow the ``__class__`` set in ``join``


def _cache_width(cache: DynamicCache) -> int:
    return int(filled_layers(cache)[0].keys.shape[2])


def _cache_device(cache: DynamicCache) -> torch.device:
    return filled_layers(cache)[0].keys.device
