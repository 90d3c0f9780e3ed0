"""Batch collators: right padding with an attention mask, or packed rows with restarting `position_ids`.

Both return a dict of tensors for the model plus token counts for throughput (`num_tokens`: real, non-pad
tokens; `num_target_tokens`: tokens the loss sees). Take the counts out before calling the model:
`inputs, counts = split_batch(batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .tokenize import IGNORE_INDEX

COUNT_KEYS = ("num_tokens", "num_target_tokens", "num_samples")


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(model inputs, counts as ints) of a collated batch."""
    inputs = {k: v for k, v in batch.items() if k not in COUNT_KEYS}
    counts = {k: int(batch[k]) for k in COUNT_KEYS if k in batch}
    return inputs, counts


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _width(lengths: list[int], multiple: int | None) -> int:
    width = max(lengths, default=0)
    return -(-width // multiple) * multiple if multiple else width


def _targets(labels: torch.Tensor) -> torch.Tensor:
    # The loss predicts labels[:, 1:] from positions [:, :-1]: a label on a first token is never seen.
    return (labels[:, 1:] != IGNORE_INDEX).sum()


@dataclass
class PaddingCollator:
    """Samples → `input_ids [B, L]`, `labels [B, L]` (-100 on padding), `attention_mask [B, L]` (1 = real),
    right-padded to the longest sample (rounded up to `pad_to_multiple_of`)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = _width(lengths, self.pad_to_multiple_of)
        labels = _pad([f["labels"] for f in features], width, IGNORE_INDEX)
        mask = _pad([[1] * n for n in lengths], width, 0)
        return {
            "input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id),
            "labels": labels,
            "attention_mask": mask,
            "num_tokens": torch.tensor(sum(lengths)),
            "num_target_tokens": _targets(labels),
            "num_samples": torch.tensor(len(features)),
        }


@dataclass
class PackingCollator:
    """Packed rows → `input_ids [B, L]`, `labels [B, L]`, `position_ids [B, L]`, and `use_cache=False`.

    No attention mask on purpose: transformers then finds each sample from `position_ids` resets and keeps
    attention inside it (a cache would switch that detection off, hence `use_cache=False`). Padding at the end
    of a row gets positions 0, 1, … of its own, so it forms a separate block and is not attended by real tokens.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(f["input_ids"]) for f in features]
        width = _width(lengths, self.pad_to_multiple_of)
        positions = [list(f["position_ids"]) + list(range(width - n)) for f, n in zip(features, lengths)]
        labels = _pad([f["labels"] for f in features], width, IGNORE_INDEX)
        return {
            "input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id),
            "labels": labels,
            "position_ids": torch.tensor(positions, dtype=torch.long).reshape(len(features), width),
            "use_cache": False,
            "num_tokens": torch.tensor(sum(lengths)),
            "num_target_tokens": _targets(labels),
            "num_samples": torch.tensor(sum(int(f.get("num_samples", 1)) for f in features)),
        }


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is never attended nor trained)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
