"""Sequence packing: several tokenised samples per row of at most `max_length` tokens.

Each row carries `position_ids` that restart at 0 for every sample. transformers v5 reads sample boundaries
from them (`masking_utils.find_packed_sequence_indices`) and builds a block-diagonal causal mask, but only when
the model gets no `attention_mask` and no KV cache, so the packing collator sends neither (`use_cache=False`).
The first label of every sample is -100: the loss predicts token t+1 from token t, so a label there would ask
the previous sample's last token to predict this sample's first one.
"""

from __future__ import annotations

from datasets import Dataset

from .tokenize import IGNORE_INDEX

OPEN_ROWS = 32  # rows kept open for first-fit: fuller rows than next-fit, still linear time


def plan_rows(lengths: list[int], max_length: int, open_rows: int = OPEN_ROWS) -> list[list[int]]:
    """Sample indices per row, first-fit in the given order over the last `open_rows` rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    first_open = 0
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
            first_open = max(first_open, len(rows) - open_rows)
    return rows


def pack_batch(batch: dict, max_length: int) -> dict:
    """Packs one batch of samples (`input_ids`, `labels` lists) into rows with `position_ids` and `num_samples`."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "num_samples": []}
    for row in plan_rows([len(x) for x in batch["input_ids"]], max_length):
        ids, labels, positions = [], [], []
        for i in row:
            sample_labels = list(batch["labels"][i])
            sample_labels[0] = IGNORE_INDEX  # never predicted from the previous sample
            ids += batch["input_ids"][i]
            labels += sample_labels
            positions += range(len(batch["input_ids"][i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_samples"].append(len(row))
    return out


def pack_dataset(ds: Dataset, max_length: int, batch_size: int = 4096) -> Dataset:
    """Rows `input_ids`, `labels`, `position_ids` (each ≤ `max_length`) and `num_samples`; packs within
    consecutive batches of `batch_size` samples (the order is already shuffled)."""
    return ds.map(pack_batch, batched=True, batch_size=batch_size, remove_columns=ds.column_names,
                  fn_kwargs={"max_length": max_length}, desc="Packing")
