"""UpIT stage 3, steps 1-2: the seed records, every expert's perplexity on each, and the bucket report.

1. Seed: `route.seed_fraction` of the training records (clamped to [seed_min, seed_max]), drawn with a seeded
   generator; `route.heldout_fraction` of it is held out to measure routing accuracy. They are tokenised as
   training does (prompt masked, truncated).
2. Buckets: each seed record's perplexity on its scored tokens (`route.tokens`: response, or all) under the dense
   model carrying expert j alone (`build_moe` with that single expert: top-1 of one expert is that expert, so the
   model is dense + expert j); `assign.assign` turns these into buckets (`route.bucketing`), reported in
   `buckets.json` (`bucket_report`).

The batching helpers (`iter_batches`, `forward_batch`, `scored_mask`) serve router pre-training too.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CraftConfig
from ..errors import ConfigError
from ..methods.expert_set import ExpertSet
from ..methods.upit import build_moe
from ..train.nll import row_nll
from .assign import RULES, quotas
from .config import RouteSettings, UpitConfig, stage_recipe

# ------------------------------------------------------------------------------------------------------ seeding


def seed_count(total: int, settings: RouteSettings) -> int:
    """Seed size: `seed_fraction * total`, clamped to [seed_min, seed_max] and to the data."""
    wanted = round(settings.seed_fraction * total)
    return min(total, max(settings.seed_min, min(settings.seed_max, wanted)))


def seed_split(total: int, settings: RouteSettings) -> tuple[list[int], list[int]]:
    """(router-training indices, held-out indices) into the training records, drawn with `route.seed`."""
    count = seed_count(total, settings)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(settings.seed))[:count].tolist()
    held = round(settings.heldout_fraction * count)
    if settings.heldout_fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    return sorted(order[held:]), sorted(order[:held])


def scored_mask(batch: dict, scope: str) -> torch.Tensor:
    """Bool `[B, T]`: the tokens that count (response tokens, or every real token)."""
    if scope == "response":
        return batch["labels"] != -100
    return batch["attention_mask"].bool()


def iter_batches(dataset, collator, batch_size: int, order: list[int] | None = None):
    order = list(range(len(dataset))) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collator([dataset[i] for i in idx])


def forward_batch(model, batch: dict, device, **kwargs):
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    return model(**inputs, use_cache=False, **kwargs)


@torch.no_grad()
def record_nll(model, dataset, collator, batch_size: int, scope: str, device="cpu") -> torch.Tensor:
    """Mean NLL per record over its scored tokens: `[S]` (perplexity = exp)."""
    out = torch.empty(len(dataset))
    for idx, batch in iter_batches(dataset, collator, batch_size):
        logits = forward_batch(model, batch, device).logits
        total, count = row_nll(logits, batch["input_ids"].to(device), scored_mask(batch, scope).to(device))
        out[idx] = (total / count.clamp(min=1)).float().cpu()
    return out


def single_expert(es: ExpertSet, j: int) -> ExpertSet:
    return dataclasses.replace(es, states=[es.states[j]], names=[es.names[j]])


def expert_nll(base_model: nn.Module, es: ExpertSet, craft: CraftConfig, dataset, collator, batch_size: int,
               scope: str, device="cpu", progress: bool = True) -> torch.Tensor:
    """`[E, S]` mean response NLL of each seed record under the dense model carrying each expert alone."""
    one = dataclasses.replace(craft, num_experts=1, top_k=1)
    rows = []
    for j in tqdm(range(len(es.states)), desc="route: expert perplexity", unit="expert", disable=not progress):
        model = build_moe(copy.deepcopy(base_model), single_expert(es, j), one).to(device).eval()
        rows.append(record_nll(model, dataset, collator, batch_size, scope, device))
        del model
    return torch.stack(rows)


def bucket_report(nll: torch.Tensor, buckets: torch.Tensor, scores: torch.Tensor | None, sources: list[str],
                  train_idx: list[int], held_idx: list[int], names: list[str], settings: RouteSettings) -> dict:
    """buckets.json: how the seed records were bucketed and the counts.

    `nll [E, S]` (seed records: the training part, then the held-out part), `buckets [S]`, `scores [E, S]` the
    normalised scores (balanced only). Counts: `sizes` (all seed records), `train_sizes` (what router
    pre-training sees), `heldout_sizes`, `argmin_sizes` (what the lowest raw perplexity would have given, to
    show a collapse avoided), `quota` (fewest and most records per expert of each part, balanced and random);
    `empty`: experts without a training record. Per record: `perplexity` (rounded), `nll` (exact, so the
    buckets can be recomputed) and `score`.
    """
    num, n_train = nll.shape[0], len(train_idx)

    def counts(b: torch.Tensor) -> list[int]:
        return torch.bincount(b, minlength=num).tolist()

    per_source: dict[str, list[int]] = {}
    for s, b in zip(sources, buckets.tolist()):
        per_source.setdefault(s, [0] * num)[b] += 1
    splits = ["train"] * n_train + ["heldout"] * len(held_idx)
    records = []
    for k, (i, split, s, b) in enumerate(zip(train_idx + held_idx, splits, sources, buckets.tolist())):
        record = {"index": i, "split": split, "source": s, "bucket": int(b),
                  "perplexity": [round(math.exp(min(float(v), 80.0)), 4) for v in nll[:, k]],
                  "nll": [float(v) for v in nll[:, k]]}
        if scores is not None:
            record["score"] = [round(float(v), 6) for v in scores[:, k]]
        records.append(record)
    train_sizes = counts(buckets[:n_train])
    balanced = settings.bucketing == "balanced"
    share = settings.min_share if balanced else 1.0
    return {"experts": names, "bucketing": settings.bucketing, "normalise": settings.normalise if balanced else None,
            "min_share": share if balanced else None, "rule": RULES[settings.bucketing], "sizes": counts(buckets),
            "train_sizes": train_sizes, "heldout_sizes": counts(buckets[n_train:]),
            "argmin_sizes": counts(nll.argmin(0)),
            "quota": {"train": list(quotas(n_train, num, share)), "heldout": list(quotas(len(held_idx), num, share))}
            if settings.bucketing != "argmin" else None,
            "empty": [names[j] for j, n in enumerate(train_sizes) if n == 0],
            "by_source": per_source, "scope": settings.tokens, "records": records}


# ---------------------------------------------------------------------------------------------------- seed data


def encode_records(records, indices: list[int], tokenizer, data_cfg) -> tuple[list[dict], list[int]]:
    """Tokenise the records at `indices` as training does (prompt masked, truncated); records with no scored
    token left are dropped. Returns (samples, the indices kept)."""
    from ..data import BadRecord, encode_conversation, resolve_template
    from ..data.templates import bos_to_add
    from ..data.tokenize import truncate

    template, bos = resolve_template(tokenizer, data_cfg.template), bos_to_add(tokenizer)
    samples, kept = [], []
    for i in indices:
        try:
            ids, labels = encode_conversation(tokenizer, records[i]["messages"], template, bos)
        except BadRecord:
            continue
        ids, labels = truncate(ids, labels, data_cfg.max_length, data_cfg.truncation, tokenizer.bos_token_id)
        if any(x != -100 for x in labels):
            samples.append({"input_ids": ids, "labels": labels})
            kept.append(i)
    return samples, kept


def seed_data(cfg: UpitConfig):
    """(collator, train-part samples, held-out samples, their record indices, their sources)."""
    from ..data import DataConfig, PaddingCollator, load_records
    from ..data.collate import pad_id_of
    from ..sources import load_tokenizer, resolve_base

    recipe = stage_recipe(cfg, "upcycle")
    data_cfg = DataConfig.from_dict(recipe.data)
    records, _, _ = load_records(data_cfg)
    train_idx, held_idx = seed_split(len(records), cfg.route)
    tokenizer = load_tokenizer(resolve_base(recipe.model))
    if tokenizer is None:
        raise ConfigError(f"base {recipe.model} has no tokenizer; routing needs one")
    train, train_idx = encode_records(records, train_idx, tokenizer, data_cfg)
    held, held_idx = encode_records(records, held_idx, tokenizer, data_cfg)
    sources = [records[i]["source"] for i in train_idx + held_idx]
    return PaddingCollator(pad_id_of(tokenizer)), train, held, train_idx, held_idx, sources
