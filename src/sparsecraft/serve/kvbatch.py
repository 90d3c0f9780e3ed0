"""A batch of sequences decoded together: left-padded token masks and a KV cache whose rows can join and leave.

Continuous batching needs three cache operations that `model.generate` never does: append the rows of a freshly
prefilled group to a running batch (the shorter side is left-padded), drop finished rows, and cut the columns
that have become padding for every row left. The cache is a plain transformers `DynamicCache` (tensors
`[B, kv_heads, T, head_dim]` per layer), read by iterating it and rebuilt from tensors with its constructor, so
nothing here depends on a model family: attention masks say which columns are real and position ids carry each
row's own positions, which is all the model needs to compute for every row what it would compute alone. Its layers
are `GrowingLayer`s, so a decode step writes its new column in place instead of concatenating the whole cache.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_argument(model) -> str:
    """The forward keyword that takes the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[n, L]` left-padded with `pad_id` and the mask `[n, L]` (1 real, 0 padding), L = longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids `[n, L]` of a left-padded mask: 0, 1, ... over the real tokens (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with spare columns: a decode step writes its
    column in place instead of copying the layer's whole cache into a new tensor (`torch.cat`, a fifth of a
    batch-40 decode step at 550 columns on a CPU). A full buffer is reallocated a quarter larger (at least 64
    columns); keys replaced from outside (a crop, a batch selection) are copied into a new buffer on the next
    update."""

    SPARE = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers = None
        old = self.keys.shape[-2] if self.keys.numel() else 0
        need = old + key_states.shape[-2]
        buffers = self._buffers
        if (buffers is None or self.keys.numel() and self.keys.data_ptr() != buffers[0].data_ptr()
                or need > buffers[0].shape[-2] or buffers[0].shape[:-2] != key_states.shape[:-2]):
            capacity = need + max(self.SPARE, need // 4)
            buffers = tuple(t.new_empty(*t.shape[:-2], capacity, t.shape[-1]) for t in (key_states, value_states))
            if old:
                buffers[0][..., :old, :] = self.keys
                buffers[1][..., :old, :] = self.values
            self._buffers = buffers
        buffers[0][..., old:need, :] = key_states
        buffers[1][..., old:need, :] = value_states
        self.keys, self.values = buffers[0][..., :need, :], buffers[1][..., :need, :]
        return self.keys, self.values


def growing_cache(layers: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> DynamicCache:
    """A `DynamicCache` of `GrowingLayer`s holding `layers` (`(keys, values)` `[B, H, T, D]` each, or `(None,
    None)` for a layer without its own cache)."""
    cache = DynamicCache()
    cache.layers, cache.layer_class_to_replicate = [], None  # as DynamicCache(ddp_cache_data=...) leaves them
    for keys, values in layers:
        layer = GrowingLayer()
        if keys is not None and values is not None:
            layer.update(keys, values)
        cache.layers.append(layer)
    return cache


def _cache_tensors(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    return [(keys, values) for keys, values, *_ in cache]


def _pad_time(t: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """Left-pad a `[B, H, T, D]` cache tensor with zeros to T = width (its masked columns are never attended)."""
    if t is None or t.numel() == 0 or t.shape[-2] == width:
        return t
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


class KVBatch:
    """The running batch: `mask [B, T]` (long), the KV cache (T columns) and per-row real lengths `[B]`.

    Row i's next token sits at position `lengths[i]`; column j of the cache is real for row i iff
    `mask[i, j] == 1`.
    """

    def __init__(self, cache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask
        self.lengths = mask.sum(-1)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def step_inputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask `[B, T+1]` and position ids `[B, 1]` for decoding one token per row."""
        mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        return mask.to(device), self.lengths.unsqueeze(1).to(device)

    def advance(self) -> None:
        """After a decode step: the cache grew by one real column in every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        self.lengths = self.lengths + 1

    def merge(self, other: KVBatch) -> KVBatch:
        """This batch's rows followed by `other`'s, the narrower one left-padded to the wider one's columns."""
        return KVBatch.concat([self, other])

    @staticmethod
    def concat(batches: list[KVBatch]) -> KVBatch:
        """The rows of all `batches` in order, each left-padded to the widest: one copy however many there are."""
        width = max(b.width for b in batches)
        layers = []
        for per_batch in zip(*(_cache_tensors(b.cache) for b in batches), strict=True):
            if any(k is None or k.numel() == 0 for k, _ in per_batch):
                layers.append((None, None))  # a layer without its own cache (KV shared with another layer)
                continue
            layers.append((torch.cat([_pad_time(k, width) for k, _ in per_batch], 0),
                           torch.cat([_pad_time(v, width) for _, v in per_batch], 0)))
        mask = torch.cat([F.pad(b.mask, (width - b.width, 0)) for b in batches], 0)
        return KVBatch(growing_cache(layers), mask)

    def select(self, rows: list[int]) -> KVBatch | None:
        """Only `rows` (in that order), without the leading columns that are padding in all of them; None when
        no row is left."""
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        real = mask.any(0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        layers = []
        for keys, values in _cache_tensors(self.cache):
            if keys is None or keys.numel() == 0:
                layers.append((None, None))
                continue
            sel = index.to(keys.device)
            layers.append((keys.index_select(0, sel)[:, :, start:], values.index_select(0, sel)[:, :, start:]))
        return KVBatch(growing_cache(layers), mask[:, start:])
