"""A batch of sequences decoded together: left-padded token masks and a KV cache whose rows can join and leave.

Continuous batching needs three cache operations that `model.generate` never does: append the rows of a freshly
prefilled group to a running batch (the shorter side is left-padded), drop finished rows, and cut the columns
that have become padding for every row left. The cache is a plain transformers `DynamicCache` (tensors
`[B, kv_heads, T, head_dim]` per layer), read by iterating it and rebuilt from tensors with its constructor, so
nothing here depends on a model family: attention masks say which columns are real and position ids carry each
row's own positions, which is all the model needs to compute for every row what it would compute alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache


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
        width = max(self.width, other.width)
        layers = []
        for (ka, va), (kb, vb) in zip(_cache_tensors(self.cache), _cache_tensors(other.cache), strict=True):
            if ka is None or kb is None or ka.numel() == 0 or kb.numel() == 0:
                layers.append((None, None))  # a layer without its own cache (KV shared with another layer)
                continue
            layers.append((torch.cat([_pad_time(ka, width), _pad_time(kb, width)], 0),
                           torch.cat([_pad_time(va, width), _pad_time(vb, width)], 0)))
        mask = torch.cat([F.pad(self.mask, (width - self.width, 0)), F.pad(other.mask, (width - other.width, 0))], 0)
        return KVBatch(DynamicCache(ddp_cache_data=layers), mask)

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
        return KVBatch(DynamicCache(ddp_cache_data=layers), mask[:, start:])
