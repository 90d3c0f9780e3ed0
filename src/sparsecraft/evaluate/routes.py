"""Routing statistics of a crafted model over data: do experts specialise?

Per crafted layer and expert, over the real (non-padding) tokens of the data: the share of routed slots, the
mean gate value, the router's entropy (per token over all experts, and of the load), which experts are chosen
together, and per data source (math / code / general) which experts win. Works for every model whose MoE blocks
derive from `RoutedBlock` (PESC and Sparse Upcycling): the routing comes from the model's own
`RoutingRecorder`, so what is counted is exactly what the forward chose.

    stats = routing_stats(model, tokenizer, data_sources(["math=heldout/math.jsonl", "code.jsonl"]))
    write_routes(stats, "runs/pesc/routes")      # routes.json, CSVs, heatmap and per-source plots
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..moe.layers import RoutedBlock, RoutingRecord, RoutingRecorder
from ..moe.model import token_mask_for

ROUTES_JSON = "routes.json"
RECIPE_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class RoutingStats:
    """Routing counted over the real tokens of some data. L crafted layers, E experts, S sources, k = top_k.

    Raw sums (what is accumulated, and what `to_dict` stores):
        counts `[L, E]` int64: (token, slot) assignments per expert; each token fills k slots.
        gate_sums `[L, E]` float64: sum of the gate values of those assignments.
        entropy_sums `[L]` float64: sum over tokens of the entropy (nats) of the softmax over all E logits.
        coselection `[L, E, E]` int64: tokens whose k chosen experts include both i and j; the diagonal is the
            number of tokens choosing i (equal to `counts`, since a token never picks an expert twice).
        source_counts `[S, L, E]` int64: `counts` restricted to each source's tokens.
    """

    method: str
    num_experts: int
    top_k: int
    routing: str
    normalize_topk: bool
    layers: list[int]
    sources: list[str]
    tokens: int
    source_tokens: list[int]
    source_records: list[int]
    counts: torch.Tensor
    gate_sums: torch.Tensor
    entropy_sums: torch.Tensor
    coselection: torch.Tensor
    source_counts: torch.Tensor
    dropped: dict = field(default_factory=dict)  # records left out at tokenisation, per reason

    # derived views -------------------------------------------------------------------------------------

    def token_share(self) -> torch.Tensor:
        """`[L, E]` float64: fraction of routed slots per expert; each row sums to 1 (uniform: 1/E)."""
        return self.counts.double() / max(self.tokens * self.top_k, 1)

    def mean_gate(self) -> torch.Tensor:
        """`[L, E]` float64: mean gate value of an expert's assignments; NaN for an expert never chosen."""
        return torch.where(self.counts > 0, self.gate_sums / self.counts.clamp_min(1).double(),
                           torch.full_like(self.gate_sums, math.nan))

    def router_entropy(self) -> torch.Tensor:
        """`[L]` float64: mean per-token entropy (nats) of the full router softmax; 0 = certain, log E = uniform."""
        return self.entropy_sums / max(self.tokens, 1)

    def load_entropy(self) -> torch.Tensor:
        """`[L]` float64: entropy (nats) of the load distribution `token_share`; log E = perfectly balanced."""
        return torch.special.entr(self.token_share()).sum(-1)

    def load_imbalance(self) -> torch.Tensor:
        """`[L]` float64: max / mean expert load, as the training logs report it (1 = balanced)."""
        counts = self.counts.double()
        return counts.max(-1).values / counts.mean(-1).clamp_min(1e-12)

    def coselection_fraction(self) -> torch.Tensor:
        """`[L, E, E]` float64: `coselection` as a fraction of the tokens."""
        return self.coselection.double() / max(self.tokens, 1)

    def source_share(self) -> torch.Tensor:
        """`[S, L, E]` float64: `token_share` within each source's tokens."""
        per_source = torch.tensor(self.source_tokens, dtype=torch.float64).clamp_min(1) * self.top_k
        return self.source_counts.double() / per_source[:, None, None]

    def specialisation(self) -> torch.Tensor:
        """`[L]` float64: mean over sources of the total-variation distance between a source's expert share and
        the overall share (0: every source routes alike; 1: disjoint experts)."""
        if not self.sources:
            return torch.zeros(len(self.layers), dtype=torch.float64)
        diff = (self.source_share() - self.token_share()[None]).abs().sum(-1) / 2
        return diff.mean(0)

    def top_experts(self) -> dict[str, list[int]]:
        """`{source: [the most used expert per layer]}`."""
        share = self.source_share()
        return {name: share[s].argmax(-1).tolist() for s, name in enumerate(self.sources)}

    # serialisation -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Everything, raw and derived, as JSON-ready lists (NaN becomes null when written by `to_json`)."""
        return {
            "format": "sparsecraft.routes/1",
            "method": self.method, "num_experts": self.num_experts, "top_k": self.top_k,
            "routing": self.routing, "normalize_topk": self.normalize_topk,
            "layers": self.layers, "sources": self.sources, "tokens": self.tokens,
            "source_tokens": self.source_tokens, "source_records": self.source_records,
            "dropped": dict(self.dropped),
            "max_entropy": math.log(self.num_experts),
            "counts": self.counts.tolist(),
            "gate_sums": self.gate_sums.tolist(),
            "entropy_sums": self.entropy_sums.tolist(),
            "coselection": self.coselection.tolist(),
            "source_counts": self.source_counts.tolist(),
            "token_share": self.token_share().tolist(),
            "mean_gate": self.mean_gate().tolist(),
            "router_entropy": self.router_entropy().tolist(),
            "load_entropy": self.load_entropy().tolist(),
            "load_imbalance": self.load_imbalance().tolist(),
            "specialisation": self.specialisation().tolist(),
            "source_share": {name: self.source_share()[s].tolist() for s, name in enumerate(self.sources)},
            "top_experts": self.top_experts(),
        }

    def to_json(self) -> str:
        from .plots import _json_safe

        return json.dumps(_json_safe(self.to_dict()), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> RoutingStats:
        """Back from `to_dict` (derived fields are recomputed)."""
        try:
            return cls(
                method=d["method"], num_experts=int(d["num_experts"]), top_k=int(d["top_k"]), routing=d["routing"],
                normalize_topk=bool(d["normalize_topk"]), layers=list(d["layers"]), sources=list(d["sources"]),
                tokens=int(d["tokens"]), source_tokens=list(d["source_tokens"]),
                source_records=list(d["source_records"]),
                counts=torch.tensor(d["counts"], dtype=torch.int64),
                gate_sums=torch.tensor(d["gate_sums"], dtype=torch.float64),
                entropy_sums=torch.tensor(d["entropy_sums"], dtype=torch.float64),
                coselection=torch.tensor(d["coselection"], dtype=torch.int64),
                source_counts=torch.tensor(d["source_counts"], dtype=torch.int64).reshape(
                    len(d["sources"]), len(d["layers"]), int(d["num_experts"])),
                dropped=dict(d.get("dropped", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a sparsecraft routes file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def read(cls, path: str | os.PathLike) -> RoutingStats:
        """Read `routes.json` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / ROUTES_JSON
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read routing statistics {path}: {exc}") from None
        return cls.from_dict(data)

    def write_csvs(self, out_dir: str | os.PathLike) -> list[Path]:
        """`layers.csv` (per layer), `experts.csv` (per layer and expert), `coselection.csv` (pairs i < j) and
        `sources.csv` (per source, layer and expert)."""
        from .plots import write_csv

        out = Path(out_dir)
        share, gate = self.token_share(), self.mean_gate()
        router_h, load_h = self.router_entropy(), self.load_entropy()
        imbalance, special = self.load_imbalance(), self.specialisation()
        max_h = math.log(self.num_experts)
        written = [write_csv(out / "layers.csv",
                             ["layer", "tokens", "router_entropy", "load_entropy", "max_entropy", "load_imbalance",
                              "specialisation"],
                             [(layer, self.tokens, float(router_h[i]), float(load_h[i]), max_h, float(imbalance[i]),
                               float(special[i])) for i, layer in enumerate(self.layers)])]
        written.append(write_csv(out / "experts.csv", ["layer", "expert", "slots", "token_share", "mean_gate"],
                                 [(layer, e, int(self.counts[i, e]), float(share[i, e]), float(gate[i, e]))
                                  for i, layer in enumerate(self.layers) for e in range(self.num_experts)]))
        written.append(write_csv(out / "coselection.csv", ["layer", "expert_i", "expert_j", "tokens", "fraction"],
                                 [(layer, a, b, int(self.coselection[i, a, b]),
                                   int(self.coselection[i, a, b]) / max(self.tokens, 1))
                                  for i, layer in enumerate(self.layers)
                                  for a in range(self.num_experts) for b in range(a + 1, self.num_experts)]))
        source_share = self.source_share()
        written.append(write_csv(out / "sources.csv", ["source", "layer", "expert", "slots", "share",
                                                       "share_minus_uniform"],
                                 [(name, layer, e, int(self.source_counts[s, i, e]), float(source_share[s, i, e]),
                                   float(source_share[s, i, e]) - 1.0 / self.num_experts)
                                  for s, name in enumerate(self.sources) for i, layer in enumerate(self.layers)
                                  for e in range(self.num_experts)]))
        return written


# ---------------------------------------------------------------------------------------------- collecting


def gates_from_logits(logits: torch.Tensor, indices: torch.Tensor, routing: str, normalize_topk: bool,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The gates `[N, k]` that `moe.router.route` gave the chosen `indices: [N, k]`, from logits `[N, E]`.

    The same operations in the same dtype as `route` (softmax over the kept logits, or softmax over all then
    the kept probabilities, renormalised if asked), so the values are identical to the forward's.
    """
    logits = logits.to(dtype)
    if routing == "topk_softmax":
        return torch.softmax(logits.gather(-1, indices), dim=-1)
    if routing == "softmax_topk":
        gates = torch.softmax(logits, dim=-1).gather(-1, indices)
        return gates / gates.sum(dim=-1, keepdim=True) if normalize_topk else gates
    raise ConfigError(f"unknown routing order {routing!r}")


def routed_blocks(model: torch.nn.Module) -> list[RoutedBlock]:
    """The model's MoE blocks (PESC or upcycled) in layer order; ConfigError for a dense model."""
    from ..craft import crafted_layers, is_crafted

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
        # route() computes gates in fp32 unless the router runs in the model's dtype
        self._gate_dtypes = {b.layer_index: torch.float32 if cfg.router_dtype == "float32" else b.router.weight.dtype
                             for b in blocks}
        self.method = getattr(model, "_sparsecraft_method", "pesc")
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
            logits, indices = rec.logits.detach().float().cpu(), rec.indices.detach().cpu()
            mask = token_mask_for(rec, attention_mask)
            rows = logits.shape[0] // rec.num_tokens_per_row
            token_source = None
            if self.sources:
                ids = source_ids if source_ids is not None else torch.zeros(rows, dtype=torch.int64)
                token_source = ids.cpu().long().repeat_interleave(rec.num_tokens_per_row)
            if mask is not None:
                mask = mask.cpu()
                logits, indices = logits[mask], indices[mask]
                token_source = token_source[mask] if token_source is not None else None
            gates = gates_from_logits(logits, indices, self.config.routing, self.config.normalize_topk,
                                      self._gate_dtypes[rec.layer])
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
def collect_routing(model: torch.nn.Module, batches, sources: Sequence[str] = (),
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


# ---------------------------------------------------------------------------------------------- data


def data_sources(items: Sequence[str]) -> list:
    """`DataSource`s from command-line items: `name=path.jsonl`, a path (name: the file's stem), or a recipe
    YAML (its `data.eval_sources`, else its `data.sources`)."""
    from ..data import DataConfig, DataSource
    from ..train.recipe import load_recipe

    sources = []
    for item in items:
        name, path = None, item
        head, sep, tail = item.partition("=")
        if sep and head and "/" not in head and os.sep not in head and not Path(item).exists():
            name, path = head, tail
        if not path:
            raise ConfigError(f"data item {item!r}: expected NAME=PATH or PATH")
        if path.endswith(RECIPE_SUFFIXES):
            if name is not None:
                raise ConfigError(f"data item {item!r}: a recipe names its own sources; give it without NAME=")
            data = DataConfig.from_dict(load_recipe(path).data)
            sources += data.eval_sources or data.sources
            continue
        if not Path(path).is_file():
            raise ConfigError(f"data file not found: {path}")
        sources.append(DataSource(path=path, name=name))
    if not sources:
        raise ConfigError("no data to route: give at least one NAME=PATH.jsonl (or a recipe YAML)")
    return sources


def _saved_config(model_dir: str | os.PathLike) -> dict:
    config = Path(model_dir) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_method(model_dir: str | os.PathLike) -> str | None:
    """`pesc`, `upcycle` or `dense` for a sparsecraft directory; None for anything else."""
    method = _saved_config(model_dir).get("method")
    return method if isinstance(method, str) else None


def saved_recipe_data(model_dir: str | os.PathLike) -> dict | None:
    """The `data` section of the recipe a trained model was saved with (its config.json), if any."""
    recipe = _saved_config(model_dir).get("recipe")
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return data if isinstance(data, dict) and data.get("sources") else None


def tokenise_sources(sources: Sequence, tokenizer, template: str = "auto", max_length: int = 512,
                     max_records: int | None = None, truncation: str = "right"):
    """Read and tokenise each source exactly as training does (same formats, template, masking, truncation).

    Returns `(dataset with input_ids/labels/source, source names in order, records kept per name, dropped
    counts)`. `max_records`: the first N usable records of each file.
    """
    from datasets import Dataset

    from ..data import load_source, tokenize_records

    if max_records is not None and max_records <= 0:
        raise ConfigError(f"--max-records must be positive, got {max_records}")
    rows, names = [], []
    for source in sources:
        records, _ = load_source(source, split="eval")
        records = records[:max_records] if max_records else records
        rows += records
        if source.display_name not in names:
            names.append(source.display_name)
    dataset, dropped = tokenize_records(Dataset.from_list(rows), tokenizer, template, max_length, truncation)
    if len(dataset) == 0:
        raise ConfigError(f"no record left after tokenisation (dropped: {dict(dropped)})")
    kept = Counter(dataset["source"])
    return dataset, names, [kept.get(n, 0) for n in names], dict(dropped)


def _batches(dataset, names: list[str], pad_id: int, batch_size: int) -> list[dict]:
    """Padded batches, samples sorted by length (less padding; the statistics do not depend on order)."""
    from ..data import PaddingCollator

    collator = PaddingCollator(pad_id)
    index = {n: i for i, n in enumerate(names)}
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        samples = [dataset[i] for i in order[start:start + batch_size]]
        batch = collator(samples)
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "source_ids": torch.tensor([index[s["source"]] for s in samples])})
    return batches


def routing_stats(model: torch.nn.Module, tokenizer, sources: Sequence, *, max_records: int | None = 200,
                  batch_size: int = 8, max_length: int = 512, template: str = "auto", truncation: str = "right",
                  progress: bool = False) -> RoutingStats:
    """Routing statistics of `model` over data files (`DataSource`s, e.g. from `data_sources`), tokenised as in
    training; each file's records count towards its source name."""
    from ..data.collate import pad_id_of

    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {max_length}")
    routed_blocks(model)  # a dense model fails before any data is read
    dataset, names, kept, dropped = tokenise_sources(sources, tokenizer, template, max_length, max_records,
                                                     truncation)
    batches = _batches(dataset, names, pad_id_of(tokenizer), batch_size)
    stats = collect_routing(model, batches, names, progress=progress, total=len(batches))
    stats.source_records = kept
    stats.dropped = dropped
    return stats


# ---------------------------------------------------------------------------------------------- output


def write_routes(stats: RoutingStats, out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None,
                 title: str | None = None) -> list[Path]:
    """Write `routes.json`, the CSVs and the plots (load heatmap, per-source share, co-selection, and the
    aux-loss / load-imbalance curve when a training `metrics.jsonl` is given and holds router metrics)."""
    from .plots import (
        atomic_write,
        plot_coselection,
        plot_domain_share,
        plot_load_heatmap,
        plot_router_curves,
        read_metrics,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written = [atomic_write(out / ROUTES_JSON, stats.to_json())]
    written += stats.write_csvs(out)
    written.append(plot_load_heatmap(stats.token_share().numpy(), stats.layers, out / "load_heatmap.png",
                                     f"{prefix}expert load, share of routed slots ({stats.tokens} tokens)"))
    if stats.sources:
        share = stats.source_share()
        written.append(plot_domain_share({n: share[s].numpy() for s, n in enumerate(stats.sources)}, stats.layers,
                                         out / "domain_share.png", f"{prefix}which experts each source uses"))
    if stats.top_k > 1:
        written.append(plot_coselection(stats.coselection_fraction().mean(0).numpy(), out / "coselection.png"))
    if metrics_path is not None:
        curve = plot_router_curves({title or "run": read_metrics(metrics_path)}, out / "router_curves.png")
        if curve is not None:
            written.append(curve)
    return written


def format_summary(stats: RoutingStats) -> str:
    """A few lines for the terminal: per layer entropy, balance and each source's favourite expert."""
    max_h = math.log(stats.num_experts)
    router_h, load_h = stats.router_entropy(), stats.load_entropy()
    imbalance, special = stats.load_imbalance(), stats.specialisation()
    top = stats.top_experts()
    head = (f"{stats.method}: {stats.tokens} tokens, {len(stats.layers)} layers, {stats.num_experts} experts, "
            f"top-{stats.top_k}; entropies in nats (uniform = {max_h:.3f})")
    lines = [head,
             "layer  router_H  load_H  imbalance  specialisation  " + "  ".join(f"top[{n}]" for n in stats.sources)]
    for i, layer in enumerate(stats.layers):
        lines.append(f"{layer:>5}  {router_h[i]:8.3f}  {load_h[i]:6.3f}  {imbalance[i]:9.2f}  {special[i]:14.3f}  "
                     + "  ".join(f"{top[n][i]:>{len(n) + 5}}" for n in stats.sources))
    return "\n".join(lines)
