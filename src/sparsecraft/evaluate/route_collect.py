"""Collecting routing from a crafted model's forwards into `RoutingStats`.

Works for every model whose MoE blocks derive from `RoutedBlock` (PESC and Sparse Upcycling): the routing comes
from the model's own `RoutingRecorder`, so what is counted is exactly what the forward chose. Padding is left
out through the attention mask; each batch row may name its data source. Reading and batching data files is
`route_data`'s job; this module only sees tensors.

    stats = collect_routing(model, [{"input_ids": ids, "attention_mask": mask, "source_ids": src}], ["math"])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..moe.layers import RoutedBlock, RoutingRecord, RoutingRecorder
from ..moe.model import token_mask_for
from ..surgery import method_name_of
from .route_stats import RoutingStats


def routed_blocks(model: torch.nn.Module) -> list[RoutedBlock]:
    """The model's MoE blocks (PESC or upcycled) in layer order; ConfigError for a dense model."""
    from ..surgery import crafted_layers, is_crafted

    if not is_crafted(model):
        raise ConfigError(f"{type(model).__name__} is a dense model: routing statistics need a pesc or upcycle "
                          "model")
    blocks = [mlp.moe for _, mlp in crafted_layers(model)]
    if not blocks:
        raise ConfigError("the model has no crafted layer to analyse")
    return blocks


class _CapturingRecorder(RoutingRecorder):
    """A `RoutingRecorder` that also keeps each forward's records (the model's own one discards them)."""

    def __init__(self) -> None:
        super().__init__()
        self.captured: list[list[RoutingRecord]] = []

    def stop(self) -> list:
        records = super().stop()
        self.captured.append(records)
        return records


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[list[list[RoutingRecord]]]:
    """Within the block, every forward of `model` appends its list of `RoutingRecord`s (one per crafted layer)
    to the yielded list. The model's recorder is put back afterwards."""
    blocks = routed_blocks(model)
    original = model._sparsecraft_recorder
    recorder = _CapturingRecorder()
    model._sparsecraft_recorder = recorder
    for block in blocks:
        block.recorder = recorder
    try:
        yield recorder.captured
    finally:
        model._sparsecraft_recorder = original
        for block in blocks:
            block.recorder = original


class RoutingCollector:
    """Accumulates `RoutingStats` from forwards' records, token masks and per-token source ids."""

    def __init__(self, model: torch.nn.Module, sources: Sequence[str]) -> None:
        blocks = routed_blocks(model)
        cfg = model._sparsecraft_config
        self.config = cfg
        self.layers = [b.layer_index for b in blocks]
        self._position = {layer: i for i, layer in enumerate(self.layers)}
        self.method = method_name_of(model)
        self.sources = list(sources)
        L, E, S = len(self.layers), cfg.num_experts, len(self.sources)
        self.tokens = 0
        self.source_tokens = torch.zeros(S, dtype=torch.int64)
        self.source_records = [0] * S
        self.counts = torch.zeros(L, E, dtype=torch.int64)
        self.gate_sums = torch.zeros(L, E, dtype=torch.float64)
        self.entropy_sums = torch.zeros(L, dtype=torch.float64)
        self.coselection = torch.zeros(L, E, E, dtype=torch.int64)
        self.source_counts = torch.zeros(S, L, E, dtype=torch.int64)

    def add(self, records: list[RoutingRecord], attention_mask: torch.Tensor | None,
            source_ids: torch.Tensor | None = None) -> None:
        """One forward's records. `attention_mask: [B, T]` (1 = real token) excludes padding; `source_ids: [B]`
        names each row's source (index into `sources`; None: all rows from source 0, if any)."""
        E = self.config.num_experts
        seen_layers = set()
        for rec in records:
            if rec.layer not in self._position:
                continue
            if rec.layer in seen_layers:
                raise RuntimeError(f"layer {rec.layer} recorded twice in one forward")
            seen_layers.add(rec.layer)
            i = self._position[rec.layer]
            logits, indices, gates = rec.logits.detach().float().cpu(), rec.indices.detach().cpu(), rec.gates.cpu()
            mask = token_mask_for(rec, attention_mask)
            rows = logits.shape[0] // rec.num_tokens_per_row
            token_source = None
            if self.sources:
                ids = source_ids if source_ids is not None else torch.zeros(rows, dtype=torch.int64)
                token_source = ids.cpu().long().repeat_interleave(rec.num_tokens_per_row)
            if mask is not None:
                mask = mask.cpu()
                logits, indices, gates = logits[mask], indices[mask], gates[mask]
                token_source = token_source[mask] if token_source is not None else None
            chosen = torch.zeros(indices.shape[0], E, dtype=torch.float64).scatter_(1, indices, 1.0)  # [N, E]
            self.counts[i] += torch.bincount(indices.reshape(-1), minlength=E)
            self.gate_sums[i].index_add_(0, indices.reshape(-1), gates.reshape(-1).double())
            # the softmax in fp32, as the router computes (a one-hot distribution then has exactly zero entropy)
            self.entropy_sums[i] += torch.special.entr(torch.softmax(logits, dim=-1)).double().sum()
            # exact integer counts: float64 holds integers up to 2**53
            self.coselection[i] += (chosen.T @ chosen).round().long()
            if token_source is not None:
                per_source = torch.zeros(len(self.sources), E, dtype=torch.float64)
                per_source.index_add_(0, token_source, chosen)
                self.source_counts[:, i] += per_source.round().long()
            if i == 0:
                self.tokens += indices.shape[0]
                if token_source is not None:
                    self.source_tokens += torch.bincount(token_source, minlength=len(self.sources))
                    row_sources = ids.cpu().long()
                    for s, n in enumerate(torch.bincount(row_sources, minlength=len(self.sources)).tolist()):
                        self.source_records[s] += n
        if seen_layers != set(self.layers):
            missing = sorted(set(self.layers) - seen_layers)
            raise RuntimeError(f"no routing recorded for layers {missing}: was the model called in between?")

    def stats(self, dropped: dict | None = None) -> RoutingStats:
        cfg = self.config
        return RoutingStats(
            method=self.method, num_experts=cfg.num_experts, top_k=cfg.top_k, routing=cfg.routing,
            normalize_topk=cfg.normalize_topk, layers=list(self.layers), sources=list(self.sources),
            tokens=self.tokens, source_tokens=self.source_tokens.tolist(), source_records=list(self.source_records),
            counts=self.counts.clone(), gate_sums=self.gate_sums.clone(), entropy_sums=self.entropy_sums.clone(),
            coselection=self.coselection.clone(), source_counts=self.source_counts.clone(),
            dropped=dict(dropped or {}),
        )


@torch.no_grad()
def collect_routing(model: torch.nn.Module, batches: Iterable[dict], sources: Sequence[str] = (),
                    progress: bool = False, total: int | None = None) -> RoutingStats:
    """Routing statistics over `batches`: dicts with `input_ids [B, T]`, optional `attention_mask [B, T]` and
    optional `source_ids [B]` (indices into `sources`). The model runs in eval mode (no dropout), then is put
    back in the mode it was in."""
    from tqdm.auto import tqdm

    collector = RoutingCollector(model, sources)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_routing(model) as captured:
            for batch in tqdm(batches, total=total, disable=not progress, desc="routing", unit="batch"):
                mask = batch.get("attention_mask")
                inputs = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
                if mask is not None:
                    inputs["attention_mask"] = mask.to(device)
                model(**inputs)
                collector.add(captured.pop(), mask, batch.get("source_ids"))
    finally:
        model.train(was_training)
    return collector.stats()
