"""A batch of sequences decoded together: left-padded token masks and a KV cache whose rows can join and leave.

Continuous batching needs cache operations that `model.generate` never does: append the rows of a freshly prefilled
group to a running batch (the shorter side is left-padded), free finished rows and write new requests' rows into
them in place, drop rows, and cut the columns that have become padding for every row left. The cache is a plain
transformers `DynamicCache` (tensors `[B, kv_heads, T, head_dim]` per layer), read by iterating it and rebuilt from
tensors by `growing_cache`, so nothing here depends on a model family: attention masks say which columns are real
and position ids carry each row's own positions, which is all the model needs to compute for every row what it would
compute alone. Its layers are `GrowingLayer`s, so a decode step writes its new column in place instead of
concatenating the whole cache.
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


def first_real_column(mask: torch.Tensor) -> int:
    """The first column of a `[n, T]` mask that is real in any row (T when none is): the columns before it are
    padding in every row and can be cut."""
    real = mask.any(0).nonzero()
    return int(real[0]) if real.numel() else mask.shape[1]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids `[n, L]` of a left-padded mask: 0, 1, ... over the real tokens (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with spare columns: a decode step writes its
    column in place instead of copying the layer's whole cache into a new tensor (`torch.cat`, a fifth of a
    batch-40 decode step at 550 columns on a CPU), and `drop_leading` cuts columns off the front by moving the
    view. A full buffer is reallocated a quarter larger (at least 64 columns); keys replaced from outside by a new
    tensor (a batch selection) are copied into a new buffer on the next update (a crop, a view of the same buffer
    start, is not)."""

    SPARE = 64

    def _own_view(self) -> bool:
        """Whether `keys` is still the view of the buffer this layer made (not replaced from outside)."""
        if self._buffers is None or self.keys.numel() == 0:
            return False
        buffer = self._buffers[0]  # pointer arithmetic, not a slice: this runs for every layer at every step
        return self.keys.data_ptr() == buffer.data_ptr() + self._start * buffer.stride(-2) * buffer.element_size()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._buffers, self._start = None, 0
        old = self.keys.shape[-2] if self.keys.numel() else 0
        need = old + key_states.shape[-2]
        if (not (self._own_view() or old == 0 and self._buffers is not None)
                or self._start + need > self._buffers[0].shape[-2]
                or self._buffers[0].shape[:-2] != key_states.shape[:-2]):
            capacity = need + max(self.SPARE, need // 4)
            buffers = tuple(t.new_empty(*t.shape[:-2], capacity, t.shape[-1]) for t in (key_states, value_states))
            if old:
                buffers[0][..., :old, :] = self.keys
                buffers[1][..., :old, :] = self.values
            self._buffers, self._start = buffers, 0
        first, last = self._start + old, self._start + need
        self._buffers[0][..., first:last, :] = key_states
        self._buffers[1][..., first:last, :] = value_states
        self.keys = self._buffers[0][..., self._start:last, :]
        self.values = self._buffers[1][..., self._start:last, :]
        return self.keys, self.values

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` columns: a narrower view of the same buffer, nothing copied."""
        if not self.is_initialized or self.keys.numel() == 0 or columns <= 0:
            return
        if self._own_view():
            self._start += columns
        self.keys, self.values = self.keys[..., columns:, :], self.values[..., columns:, :]


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
    `mask[i, j] == 1`. A free row (`release`d, length 0) has no real column: it is decoded with its current token
    as its only real column and keeps none of them, so it never holds a column `trim` could cut.
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
        """After a decode step: the cache grew by one column, real in every row but the free ones."""
        live = (self.lengths > 0).to(self.mask.dtype)
        self.mask = torch.cat([self.mask, live.unsqueeze(1)], dim=1)
        self.lengths = self.lengths + live

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

    def release(self, rows: list[int]) -> None:
        """Rows whose requests ended: none of their columns is real any more, the row is free for `place`."""
        if rows:
            index = torch.tensor(rows, dtype=torch.long)
            self.mask[index] = 0
            self.lengths[index] = 0

    def place(self, rows: list[int], group: KVBatch, group_rows: list[int]) -> None:
        """Write `group`'s rows `group_rows` into this batch's (free) rows `rows` in place, aligned to the last
        column; rows longer than the batch is wide widen it first (the one case that copies the cache)."""
        src = torch.tensor(group_rows, dtype=torch.long)
        mask = group.mask.index_select(0, src)
        first = first_real_column(mask)  # the group's other rows may be longer
        if mask.shape[1] - first > self.width:
            self._widen(mask.shape[1] - first)
        start = self.width - (mask.shape[1] - first)
        dst = torch.tensor(rows, dtype=torch.long)
        for (keys, values), (g_keys, g_values) in zip(_cache_tensors(self.cache), _cache_tensors(group.cache),
                                                      strict=True):
            if keys is None or keys.numel() == 0:
                continue
            index, rows_here = src.to(g_keys.device), dst.to(keys.device)
            # the columns before `start` held an old request's values: masked, but a mask does not neutralise a
            # NaN or Inf there (0 * NaN in attention), so they are zeroed
            keys[rows_here, :, :start] = 0
            values[rows_here, :, :start] = 0
            keys[rows_here, :, start:] = g_keys.index_select(0, index)[:, :, first:]
            values[rows_here, :, start:] = g_values.index_select(0, index)[:, :, first:]
        self.mask[dst] = 0
        self.mask[dst, start:] = mask[:, first:]
        self.lengths[dst] = group.lengths.index_select(0, src)

    def _widen(self, width: int) -> None:
        layers = [(_pad_time(k, width), _pad_time(v, width)) for k, v in _cache_tensors(self.cache)]
        self.cache = growing_cache([(k, v) if k is not None and k.numel() else (None, None) for k, v in layers])
        self.mask = F.pad(self.mask, (width - self.width, 0))

    def trim(self, min_columns: int = 64) -> int:
        """Cut the leading columns that are padding in every row, once there are at least `min_columns` of them
        (views of the same buffers: nothing is copied). Returns how many were cut."""
        start = first_real_column(self.mask)
        if start < min_columns:
            return 0
        for layer in self.cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.drop_leading(start)
            elif layer.is_initialized and layer.keys.numel():
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        self.mask = self.mask[:, start:]
        return start

    def select(self, rows: list[int]) -> KVBatch | None:
        """Only `rows` (in that order), without the leading columns that are padding in all of them; None when
        no row is left."""
        if not rows:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        start = first_real_column(mask)
        layers = []
        for keys, values in _cache_tensors(self.cache):
            if keys is None or keys.numel() == 0:
                layers.append((None, None))
                continue
            sel = index.to(keys.device)
            layers.append((keys.index_select(0, sel)[:, :, start:], values.index_select(0, sel)[:, :, start:]))
        return KVBatch(growing_cache(layers), mask[:, start:])
