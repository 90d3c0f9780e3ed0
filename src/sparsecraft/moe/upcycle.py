"""Sparse Upcycling (Komatsuzaki et al. 2022), the baseline PESC is compared with.

Each chosen dense FFN becomes a mixture of E full copies of itself (all trainable) behind a top-k router on the
FFN input. Routing orders, router dtype, recorded routing and router losses are PESC's (`RoutedBlock`), so the two
methods differ only in what an expert is. How a model is upcycled is `methods/upcycle.py`.

The FFN attribute keeps its name and holds the block as `moe`, so keys read `model.layers.3.mlp.moe.router.weight
[E, h]` and `model.layers.3.mlp.moe.experts.gate_up_proj [E, 2i, h]` / `...experts.down_proj [E, h, i]` (the
layout of transformers' Mixtral experts). The dense FFN's own keys disappear: the copies replace it.

Experts are stored in one of two forms:

- `GatedExperts`: the FFN is a plain gated MLP (`gate_proj`/`up_proj` or fused `gate_up_proj`, `down_proj`,
  `act_fn`/`activation_fn`, bias-free `nn.Linear`s, nothing else), as in LLaMA, Mistral, Qwen2/3, Gemma3, Phi-3.
  Weights are stacked and routed tokens run through `torch._grouped_mm` (sorted-slices loop where it is
  unavailable). A numerical probe confirms the FFN really computes `down(act(gate x) * up x)` first.
- `CopiedExperts`: anything else (biases, dropout, quantized or LoRA-wrapped linears, other forwards): a
  `ModuleList` of deep copies and a Python loop over experts. Slower, but computes exactly what the FFN did.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from .experts import ContiguousGrad, autocast_off, expert_compute_dtype, grouped_mm_available, sort_by_expert
from .gated import gated_weights, join_gate_up, split_gate_up
from .layers import RoutedBlock, RouterSite


class GatedExperts(nn.Module):
    """E copies of a gated MLP: `gate_up_proj [E, 2i, h]` (gate rows first), `down_proj [E, h, i]`, `act_fn`.

    Expert e computes `down_proj[e] @ (act(gate) * up)` with `gate, up = chunk(gate_up_proj[e] @ x, 2)`.
    `fused` records whether the dense FFN had one `gate_up_proj` (Phi-3) or `gate_proj` + `up_proj`.
    """

    def __init__(
        self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: nn.Module, num_experts: int, fused: bool = False
    ) -> None:
        super().__init__()
        self.fused = fused
        # repeat (not expand) so every expert owns its storage and can train apart from the others
        self.gate_up_proj = nn.Parameter(gate_up.detach().unsqueeze(0).repeat(num_experts, 1, 1))
        self.down_proj = nn.Parameter(down.detach().unsqueeze(0).repeat(num_experts, 1, 1))
        self.act_fn = act_fn

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_proj.dtype

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"num_experts={e}, hidden={h}, intermediate={two_i // 2}"

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert `e` under the dense MLP's own parameter names (views of the stacked weights)."""
        return {**split_gate_up(self.gate_up_proj[e], self.fused), "down_proj.weight": self.down_proj[e]}

    @torch.no_grad()
    def set_expert_weights(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        """Write a dense MLP's state dict (`expert_weights` names) into expert `e`."""
        self.gate_up_proj[e].copy_(join_gate_up(weights).to(self.gate_up_proj.dtype))
        self.down_proj[e].copy_(weights["down_proj.weight"].to(self.down_proj.dtype))

    def _glu(self, t: torch.Tensor) -> torch.Tensor:
        gate, up = t.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, path: str = "grouped"):
        """`x: [N, h]`, `gates: [N, k]` (x's dtype), `indices: [N, k]` int64 -> `sum_j g_j FFN_{e_j}(x)`: `[N, h]`.

        `path`: `grouped` (`torch._grouped_mm`, falling back to `sorted` where unavailable) or `sorted`
        (a loop over the contiguous per-expert slices of the sorted (token, slot) pairs).
        """
        token, gate, counts = sort_by_expert(indices, gates, self.num_experts)
        xs = x.index_select(0, token)  # [N*k, h], grouped by expert
        # weights in x's dtype (a no-op unless fp32 copies run in bf16 on CUDA, see `expert_compute_dtype`)
        gate_up, down = self.gate_up_proj.to(x.dtype), self.down_proj.to(x.dtype)
        inter = down.shape[-1]
        if path == "grouped" and grouped_mm_available(x, indices.numel(), inter):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            # transposes are views of the stacked weights: no copies
            h = ContiguousGrad.apply(torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs))
            y = ContiguousGrad.apply(torch._grouped_mm(self._glu(h), down.transpose(1, 2), offs=offs))
        else:
            sizes = counts.tolist()
            pieces = [
                F.linear(self._glu(F.linear(xe, w_gu)), w_d)
                for xe, w_gu, w_d in zip(xs.split(sizes), gate_up.unbind(0), down.unbind(0))
            ]
            y = torch.cat(pieces, 0)
        # the gate scales the [N*k, h] output, the narrower side of the FFN (h < i)
        y = y * gate.unsqueeze(-1)
        return x.new_zeros(x.shape).index_add_(0, token, y)


class CopiedExperts(nn.ModuleList):
    """Fallback for FFNs of unknown structure: E deep copies called one expert at a time (a Python loop)."""

    @property
    def num_experts(self) -> int:
        return len(self)

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert `e`'s state dict (the dense FFN's own names)."""
        return dict(self[e].state_dict())

    def set_expert_weights(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        self[e].load_state_dict(weights)

    def forward(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, path: str = "loop"):
        """`x: [N, h]`, `gates, indices: [N, k]` -> `[N, h]`. Experts that get no token are not called."""
        out = None
        for e, expert in enumerate(self):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            y = expert(x.index_select(0, token))
            y = y * gates[token, slot].unsqueeze(-1).to(y.dtype)
            out = (y.new_zeros(x.shape[0], y.shape[-1]) if out is None else out).index_add(0, token, y)
        return out if out is not None else torch.zeros_like(x)


class UpcycledMoE(RoutedBlock):
    """Router `[E, h]` on the FFN input + E full-FFN experts. `forward(x: [..., h]) -> [..., h]`."""

    def __init__(self, site: RouterSite, experts: GatedExperts | CopiedExperts) -> None:
        super().__init__(site)
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        gates, indices = self.route_tokens(x_flat, shape)
        if isinstance(self.experts, GatedExperts):
            x_flat = x_flat.to(expert_compute_dtype(x_flat, self.experts.dtype))
            path = "sorted" if cfg.dispatch in ("sorted", "loop") else "grouped"
            with autocast_off(x_flat):
                out = self.experts(x_flat, gates.to(x_flat.dtype), indices, path)
        else:
            out = self.experts(x_flat, gates, indices)
        return out.to(x.dtype).view(*shape[:-1], out.shape[-1])


class UpcycledMLP(nn.Module):
    """What replaces a dense FFN: holds the block as `moe` so its keys contain `.moe.` (see module docstring)."""

    def __init__(self, moe: UpcycledMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


def is_upcycled_mlp(module: nn.Module) -> bool:
    return isinstance(module, UpcycledMLP) and isinstance(getattr(module, "moe", None), UpcycledMoE)


def make_experts(ffn: nn.Module, num_experts: int) -> GatedExperts | CopiedExperts:
    """E trainable copies of `ffn`: stacked when it is a plain gated MLP, deep copies otherwise."""
    found = gated_weights(ffn)
    if found is not None:
        gate_up, down, act, fused = found
        return GatedExperts(gate_up, down, act, num_experts, fused)
    # share config objects instead of copying them E times; the original module becomes expert 0
    memo = {id(v): v for v in vars(ffn).values() if isinstance(v, PretrainedConfig)}
    experts = CopiedExperts([ffn] + [copy.deepcopy(ffn, dict(memo)) for _ in range(num_experts - 1)])
    for p in experts.parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
    return experts


def add_noise(experts: nn.Module, std: float) -> None:
    """Independent Gaussian noise of standard deviation `std` on every copied expert weight (in place)."""
    with torch.no_grad():
        for p in experts.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.add_(torch.randn_like(p), alpha=std)
