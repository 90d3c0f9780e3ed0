"""The bench's reference PESC layer: a Python loop over experts with boolean masks, as the published code does.

Written from the formula, independently of `sparsecraft.moe` (it must not share a bug with what it measures):

    logits = W_r x;  (top, e_1..e_k) = topk(logits, k);  g = softmax(top)
    y = F + sum_e  index_add( mask_e,  s * up_e(gelu(down_e(dropout(F[mask_e])))) * g_e[mask_e] )

where `mask_e` marks the tokens that have expert `e` among their top-k and `g_e` is that token's gate for `e`.
Each expert is an `nn.Linear` pair (bias-free) and draws its own dropout mask, as in the published adapters (with
`moe.dropout`'s sampler, which PESC uses too: the timings compare dispatch, not mask drawing).
Only `topk_softmax` routing, the `residual` combine and exact GELU are implemented: what PESC uses.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe.dropout import LaneDropout
from ..moe.layers import PescMoE, RoutingRecord


class LoopAdapter(nn.Module):
    """One bottleneck adapter `up(gelu(down(dropout(F))))`: `down: h -> r`, `up: r -> h`."""

    def __init__(self, hidden: int, adapter_dim: int, dropout: float, device=None, dtype=None) -> None:
        super().__init__()
        self.dropout = LaneDropout(dropout)  # as PESC draws its masks: the bench compares dispatch, not dropout
        self.down = nn.Linear(hidden, adapter_dim, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(adapter_dim, hidden, bias=False, device=device, dtype=dtype)
        self.act = nn.GELU()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(f))))


class LoopPescBlock(nn.Module):
    """Router + E `LoopAdapter`s on a shared FFN output; `forward(x, ffn_out) -> ffn_out + routed adapters`.

    Drop-in for `PescMoE` (same call, fills the same `RoutingRecorder`, parameters under the same `moe` child),
    so a crafted model can run it in place of the stacked dispatch.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, adapter_dim: int, scaling: float = 1.0,
                 dropout: float = 0.0, layer_index: int = 0, device=None, dtype=None,
                 router_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.top_k = top_k
        self.scaling = scaling
        self.layer_index = layer_index
        self.router = nn.Linear(hidden, num_experts, bias=False, device=device, dtype=router_dtype)
        self.experts = nn.ModuleList(
            LoopAdapter(hidden, adapter_dim, dropout, device, dtype) for _ in range(num_experts)
        )
        self.recorder = None  # a RoutingRecorder when it replaces a crafted model's PescMoE

    @classmethod
    def from_pesc(cls, moe: PescMoE) -> "LoopPescBlock":
        """A loop block holding copies of a `PescMoE`'s router and adapter weights (and its recorder)."""
        cfg = moe.config
        if cfg.routing != "topk_softmax" or cfg.combine != "residual" or cfg.activation != "gelu":
            raise ValueError("the loop reference implements topk_softmax routing, residual combine and GELU only")
        down, up = moe.experts.down, moe.experts.up
        num_experts, adapter_dim, hidden = down.shape
        block = cls(hidden, num_experts, cfg.top_k, adapter_dim, cfg.scaling, cfg.dropout, moe.layer_index,
                    device=down.device, dtype=down.dtype, router_dtype=moe.router.weight.dtype)
        with torch.no_grad():
            block.router.weight.copy_(moe.router.weight)
            for e, expert in enumerate(block.experts):
                expert.down.weight.copy_(down[e])
                expert.up.weight.copy_(up[e])
        block.recorder = moe.recorder
        block.train(moe.training)
        return block

    def forward(self, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        shape = ffn_out.shape
        x_flat = x.reshape(-1, shape[-1])
        f = ffn_out.reshape(-1, shape[-1])
        logits = self.router(x_flat.to(self.router.weight.dtype)).float()
        top, indices = torch.topk(logits, self.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
        if self.recorder is not None and self.recorder.active:
            rows = shape[-2] if len(shape) > 2 else shape[0]
            self.recorder.records.append(RoutingRecord(self.layer_index, logits, indices, rows))
        adapter_dtype = self.experts[0].down.weight.dtype
        f_in = f.to(adapter_dtype)
        delta = torch.zeros_like(f_in)
        for e, expert in enumerate(self.experts):
            chosen = indices == e  # [N, k]
            mask = chosen.any(dim=-1)  # tokens with e among their top-k
            if not mask.any():  # the published code's per-expert emptiness check (a host sync)
                continue
            gate = (gates * chosen).sum(dim=-1)[mask]  # the gate of e for those tokens
            y = expert(f_in[mask]) * (self.scaling * gate).to(adapter_dtype).unsqueeze(-1)
            delta = delta.index_add(0, mask.nonzero().squeeze(1), y)
        return (f + delta.to(f.dtype)).view(shape)
