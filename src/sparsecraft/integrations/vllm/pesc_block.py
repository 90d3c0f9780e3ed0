"""PESC's MoE block in plain torch for inference engines: `y = F + s * sum_j g_j W_up_j act(W_down_j F)`.

The masked-dense form: every adapter runs on every token as two wide matmuls (`[h, E*r]`, `[E*r, h]`) with
the gates as a per-token mask in between (the per-slot combine form: one masked pass per slot). No gather, no
data-dependent shapes (so CUDA graphs and torch.compile take it as it is) and no custom kernels (so it runs on
any device vLLM runs on). Its extra FLOPs are E/k times the routed adapters', small beside the FFN for PESC's
adapter widths. Computes what sparsecraft's `PescMoE` does
in eval mode (same routing orders, router dtype, activations and combine forms; the parity test checks it).
Parameter names match sparsecraft's checkpoint keys below the MLP: `moe.router.weight [E, h]`,
`moe.experts.down [E, r, h]`, `moe.experts.up [E, h, r]` and, with `bias_balance`, `moe.router_bias [E]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class AdapterWeights(nn.Module):
    def __init__(self, num_experts: int, hidden: int, rank: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.zeros(num_experts, rank, hidden, dtype=dtype), requires_grad=False)
        self.up = nn.Parameter(torch.zeros(num_experts, hidden, rank, dtype=dtype), requires_grad=False)


class PescBlock(nn.Module):
    """Router on the FFN input, adapters on the FFN output. `craft` is a sparsecraft `CraftConfig` as a dict."""

    def __init__(self, hidden: int, craft: dict, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts = int(craft["num_experts"])
        self.top_k = int(craft["top_k"])
        self.routing = craft.get("routing", "topk_softmax")
        self.normalize_topk = bool(craft.get("normalize_topk", True))
        self.router_fp32 = craft.get("router_dtype", "float32") == "float32"
        self.scaling = float(craft.get("scaling", 1.0))
        self.per_slot = craft.get("combine", "residual") == "per_slot"
        self.act = ACTIVATIONS[craft.get("activation", "gelu")]
        rank = int(craft["adapter_dim"])
        self.router = nn.Linear(hidden, self.num_experts, bias=False, dtype=torch.float32 if self.router_fp32
                                else dtype)
        self.router.weight.requires_grad_(False)
        self.experts = AdapterWeights(self.num_experts, hidden, rank, dtype)
        if craft.get("bias_balance"):
            # DeepSeek-V3 style selection bias: shifts which experts are chosen, never the gates
            self.router_bias = nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32), requires_grad=False)
        else:
            self.router_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen experts `[N, k]` and their gates `[N, k]` (router dtype) for the FFN input `x: [N, h]`."""
        dtype = torch.float32 if self.router_fp32 else x.dtype
        logits = F.linear(x.to(dtype), self.router.weight.to(dtype))
        bias = None if self.router_bias is None else self.router_bias.to(logits.dtype)
        if self.routing == "topk_softmax":
            index = torch.topk(logits if bias is None else logits + bias, self.top_k, dim=-1).indices
            return index, torch.softmax(logits.gather(-1, index), dim=-1)
        probs = torch.softmax(logits, dim=-1)
        index = torch.topk(probs if bias is None else probs + bias, self.top_k, dim=-1).indices
        weights = probs.gather(-1, index)
        return index, weights / weights.sum(-1, keepdim=True) if self.normalize_topk else weights

    def _dense(self, index: torch.Tensor, values: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """`[N, E]` in `like`'s dtype: `values` at the chosen experts `index [N, j]`, zero elsewhere."""
        out = torch.zeros(index.shape[0], self.num_experts, dtype=like.dtype, device=like.device)
        return out.scatter(1, index, values)

    def _adapters(self, hidden_act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`sum_e mask[:, e] * W_up_e h_e`: `hidden_act [N, E*r]` (the activated bottlenecks), `mask [N, E]`."""
        num, hidden, rank = self.experts.up.shape
        h = (hidden_act.view(-1, num, rank) * mask.to(hidden_act.dtype).unsqueeze(-1)).reshape(-1, num * rank)
        return h @ self.experts.up.transpose(1, 2).reshape(num * rank, hidden)

    def forward(self, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        """`x, ffn_out: [..., h]` -> `[..., h]`."""
        shape = ffn_out.shape
        x_flat, f_flat = x.reshape(-1, shape[-1]), ffn_out.reshape(-1, shape[-1])
        index, weights = self.route(x_flat)
        num, rank, hidden = self.experts.down.shape
        h = self.act(F.linear(f_flat.to(self.experts.down.dtype), self.experts.down.reshape(num * rank, hidden)))
        if not self.per_slot:
            gates = self._dense(index, weights, weights)
            return (f_flat + self._adapters(h, gates * self.scaling).to(ffn_out.dtype)).view(shape)
        # sum_j g_j (F + A_j(F)) as sparsecraft's per-slot form rounds it (moe/layers.py): each slot's term in the
        # model dtype, added from zero in expert order; in bf16 the gates rarely sum to exactly 1
        order = index.argsort(dim=-1)
        out = torch.zeros_like(f_flat)
        for j in range(self.top_k):
            expert = index.gather(1, order[:, j:j + 1])
            adapter = self._adapters(h, self._dense(expert, self.scaling, h)).to(ffn_out.dtype)
            out = out + weights.gather(1, order[:, j:j + 1]).to(ffn_out.dtype) * (f_flat + adapter)
        return out.view(shape)


def _pesc_forward(self, x, *args, **kwargs):
    return self.moe(x, type(self).__mro__[1].forward(self, x, *args, **kwargs))


_CLASSES: dict[type, type] = {}


def attach(mlp: nn.Module, block: PescBlock) -> None:
    """Give an engine's MLP module the block as its `moe` child and a forward computing `moe(x, mlp(x))`, keeping
    the MLP's own parameter names (so the engine's weight loader still finds them)."""
    base = type(mlp)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Pesc{base.__name__}", (base,), {"forward": _pesc_forward})
    mlp.add_module("moe", block)
    mlp.__class__ = _CLASSES[base]
