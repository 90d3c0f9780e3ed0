"""The routing statistics of a crafted model over some data, and their maths: `RoutingStats`.

Raw per-layer and per-expert sums (what a `RoutingCollector` in `route_collect` accumulates) and the views
derived from them: load share, mean gate, router and load entropy, load imbalance, co-selection, per-source
share and specialisation; with their round trip through `routes.json`. Nothing here runs a model or draws.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

ROUTES_JSON = "routes.json"


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

    def domain_mi(self) -> torch.Tensor:
        """`[L]` float64: the mutual information between a routed slot's domain (its source) and the expert it
        chose, divided by the entropy of the domain: `I(D; X) / H(D)` over the joint distribution of (source,
        expert) slots, `p(d, e) = source_counts[d, l, e] / slots`. 0: the expert says nothing about the domain;
        1: each domain has experts of its own (the expert tells the domain). 0 with fewer than two sources."""
        if len(self.sources) < 2:
            return torch.zeros(len(self.layers), dtype=torch.float64)
        joint = self.source_counts.double().permute(1, 0, 2)  # [L, S, E]
        joint = joint / joint.sum((1, 2), keepdim=True).clamp_min(1)
        p_d, p_e = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        ratio = torch.where(joint > 0, joint / (p_d * p_e).clamp_min(1e-300), torch.ones_like(joint))
        mi = (joint * ratio.log()).sum((1, 2))
        h_d = torch.special.entr(p_d.squeeze(2)).sum(1)
        return torch.where(h_d > 0, mi / h_d.clamp_min(1e-300), torch.zeros_like(mi)).clamp(0, 1)

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
            "domain_mi": self.domain_mi().tolist(),
            "source_share": {name: self.source_share()[s].tolist() for s, name in enumerate(self.sources)},
            "top_experts": self.top_experts(),
        }

    def to_json(self) -> str:
        """`to_dict` as indented JSON text, NaN and infinities written as null."""
        from .plots import json_safe

        return json.dumps(json_safe(self.to_dict()), indent=2) + "\n"

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
