"""Sequence packing: rows, boundaries, and no attention across samples (same logits as each sample alone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_model, tiny_tokenizer
from datasets import Dataset

from sparsecraft.data import IGNORE_INDEX, PackingCollator, pack_dataset, split_batch, tokenize_records
from sparsecraft.data.pack import plan_rows


def conversations(n: int) -> Dataset:
    rows = [{"messages": [{"role": "user", "content": f"q{i} " + "x" * (3 * i % 17)},
                          {"role": "assistant", "content": f"answer {i} " + "y" * (5 * i % 13)}],
             "source": "s"} for i in range(n)]
    return Dataset.from_list(rows)


def tokenised(n: int = 9):
    ds, dropped = tokenize_records(conversations(n), tiny_tokenizer(), "chatml", max_length=128)
    assert not dropped
    return ds


def test_plan_rows_first_fit():
    assert plan_rows([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert plan_rows([8, 8], 8) == [[0], [1]]
    assert plan_rows([1] * 5, 2, open_rows=1) == [[0, 1], [2, 3], [4]]


def test_packed_rows_keep_every_sample_and_mask_boundaries():
    ds = tokenised()
    packed = pack_dataset(ds, max_length=128)
    assert len(packed) < len(ds) and sum(packed["num_samples"]) == len(ds)
    seen = []
    for row in packed:
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == len(labels) == len(pos) <= 128
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert len(starts) == row["num_samples"] and starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(ids)]):
            assert pos[a:b] == list(range(b - a))  # positions restart at 0 for each sample
            assert labels[a] == IGNORE_INDEX  # the first token of a sample is never a target
            seen.append((ids[a:b], labels[a:b]))
    original = sorted(zip(ds["input_ids"], ds["labels"]))
    assert sorted(seen) == original  # each sample once, its labels unchanged (its first label was -100 already)


def test_packed_logits_equal_each_sample_alone():
    """One packed batch through a tiny llama (sdpa, the default) gives each sample's own logits and loss."""
    model = tiny_model("llama")
    assert model.config.use_cache  # the default: why the collator must send use_cache=False
    ds = tokenised(6)
    packed = pack_dataset(ds, max_length=128)
    batch = PackingCollator(pad_token_id=0)([packed[i] for i in range(len(packed))])
    inputs, counts = split_batch(batch)
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    assert counts["num_samples"] == 6 and counts["num_tokens"] == sum(map(len, ds["input_ids"]))
    with torch.no_grad():
        out = model(**inputs)
        logits = out.logits  # [B, L, V]
        loss_sum, n_targets = 0.0, 0
        for r in range(len(packed)):
            pos = batch["position_ids"][r].tolist()
            n_real = len(packed[r]["input_ids"])
            starts = [i for i, p in enumerate(pos[:n_real]) if p == 0] + [n_real]
            for a, b in zip(starts, starts[1:]):
                alone = model(batch["input_ids"][r:r + 1, a:b]).logits[0]  # [T, V]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=1e-5)
                labels = batch["labels"][r, a:b]
                loss_sum += F.cross_entropy(alone[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
                n_targets += int((labels[1:] != IGNORE_INDEX).sum())
    assert n_targets == counts["num_target_tokens"]
    torch.testing.assert_close(out.loss, loss_sum / n_targets, atol=1e-5, rtol=1e-5)


def test_row_padding_is_its_own_block():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2], "num_samples": 1},
                {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1], "num_samples": 1}]
    batch = PackingCollator(pad_token_id=0)(features)
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    _, counts = split_batch(batch)
    assert counts == {"num_tokens": 5, "num_target_tokens": 3, "num_samples": 2}
