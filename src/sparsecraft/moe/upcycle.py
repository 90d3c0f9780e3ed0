"""Sparse Upcycling (Komatsuzaki et al. 2022), the baseline PESC is compared with.

Each chosen dense FFN becomes a mixture of E full copies of itself (all trainable) behind a top-k router on the
FFN input. Routing orders, router dtype, recorded routing and router losses are PESC's (`route`,
`RoutingRecorder`, `pesc_lm_class`), so the two methods differ only in what an expert is.

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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..config import CraftConfig
from ..errors import ConfigError
from .experts import _ContiguousGrad, _grouped_mm_available, _sort_by_expert
from .layers import RoutedBlock, RoutingRecorder


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

    def _glu(self, t: torch.Tensor) -> torch.Tensor:
        gate, up = t.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, path: str = "grouped"):
        """`x: [N, h]`, `gates: [N, k]` (x's dtype), `indices: [N, k]` int64 -> `sum_j g_j FFN_{e_j}(x)`: `[N, h]`.

        `path`: `grouped` (`torch._grouped_mm`, falling back to `sorted` where unavailable) or `sorted`
        (a loop over the contiguous per-expert slices of the sorted (token, slot) pairs).
        """
        token, gate, counts = _sort_by_expert(indices, gates, self.num_experts)
        xs = x.index_select(0, token)  # [N*k, h], grouped by expert
        inter = self.down_proj.shape[-1]
        if path == "grouped" and _grouped_mm_available(x, indices.numel(), inter):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            # transposes are views of the stacked weights: no copies
            h = _ContiguousGrad.apply(torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offs))
            y = _ContiguousGrad.apply(torch._grouped_mm(self._glu(h), self.down_proj.transpose(1, 2), offs=offs))
        else:
            sizes = counts.tolist()
            pieces = [
                F.linear(self._glu(F.linear(xe, w_gu)), w_d)
                for xe, w_gu, w_d in zip(xs.split(sizes), self.gate_up_proj.unbind(0), self.down_proj.unbind(0))
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

    def __init__(
        self,
        experts: GatedExperts | CopiedExperts,
        hidden_size: int,
        config: CraftConfig,
        layer_index: int,
        device: torch.device | str | None = None,
        router_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(hidden_size, config, layer_index, device, router_dtype)
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        gates, indices = self.route_tokens(x_flat, shape)
        if isinstance(self.experts, GatedExperts):
            x_flat = x_flat.to(self.experts.dtype)
            path = "sorted" if cfg.dispatch in ("sorted", "loop") else "grouped"
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


def is_upcycled(model: nn.Module) -> bool:
    return getattr(model, "_sparsecraft_method", None) == "upcycle"


def _plain_linear(module: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(module, name, None)
    return m if type(m) is nn.Linear and m.bias is None else None  # subclasses (4-bit, LoRA) excluded


def gated_weights(ffn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module, bool] | None:
    """`(gate_up [2i, h], down [h, i], act_fn, fused)` when `ffn` is a plain gated MLP computing
    `down(act(gate x) * up x)`, else None (the copy-and-loop fallback is used)."""
    act_name = next((n for n in ("act_fn", "activation_fn") if isinstance(getattr(ffn, n, None), nn.Module)), None)
    down = _plain_linear(ffn, "down_proj")
    if act_name is None or down is None:
        return None
    if _plain_linear(ffn, "gate_up_proj") is not None:
        names, gate_up = {"gate_up_proj"}, ffn.gate_up_proj.weight
    elif _plain_linear(ffn, "gate_proj") is not None and _plain_linear(ffn, "up_proj") is not None:
        names, gate_up = {"gate_proj", "up_proj"}, torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], 0)
    else:
        return None
    # no other children (dropout, norms, ...) whose effect the stacked form would drop
    if {n for n, _ in ffn.named_children()} != names | {"down_proj", act_name}:
        return None
    hidden, inter = down.weight.shape
    if gate_up.shape != (2 * inter, hidden):
        return None
    act = getattr(ffn, act_name)
    if down.weight.is_meta:
        return gate_up, down.weight, act, names == {"gate_up_proj"}  # nothing to probe on the meta device
    with torch.no_grad():  # the probe: same structure could still hide another forward
        x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)).to(down.weight)
        want = ffn(x).float()
        g, u = F.linear(x, gate_up).chunk(2, -1)
        got = F.linear(act(g) * u, down.weight).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6):
        return None
    return gate_up, down.weight, act, names == {"gate_up_proj"}


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


def _add_noise(experts: nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in experts.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.add_(torch.randn_like(p), alpha=std)


def upcycle(
    model: nn.Module,
    config: CraftConfig | None = None,
    *,
    seed: int | None = None,
    noise_std: float = 0.0,
    **overrides,
) -> nn.Module:
    """Sparse-upcycle the chosen FFNs of a transformers causal LM, in place (the counterpart of `craft`).

    Args:
        model: a transformers causal LM with a dense FFN per chosen layer.
        config: `num_experts`, `top_k`, `routing`, `normalize_topk`, `router_dtype`, `aux_loss_coef`,
            `z_loss_coef`, `layers` and `dispatch` (`sorted`/`loop` force the sliced loop) are used; the adapter
            fields are ignored. Keyword `overrides` replace fields.
        seed: seeds the router initialisation and the noise.
        noise_std: standard deviation (absolute) of independent Gaussian noise added to every copied expert
            weight, to break the symmetry between copies; 0 (default, as in Komatsuzaki et al.) keeps exact
            copies. Routing alone makes experts diverge once they receive different tokens.

    Returns:
        The same model object, of a `Pesc*` subclass of its class whose forward adds the router losses. With
        `noise_std=0` it computes what the dense model did (equal experts, gates summing to 1) up to rounding.
    """
    from ..craft import mark_crafted, plan_layers, seeded

    if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not 0 <= noise_std < math.inf:
        raise ConfigError(f"noise_std must be a non-negative number, got {noise_std!r}")
    plan = plan_layers(model, config, overrides, verb="upcycle")
    recorder = RoutingRecorder()
    with seeded(seed):
        for index, name, ffn in plan.targets:
            device = next((p.device for p in ffn.parameters()), None)
            experts = make_experts(ffn, plan.config.num_experts)
            moe = UpcycledMoE(experts, plan.hidden, plan.config, index, device=device,
                              router_dtype=plan.router_dtype)
            if noise_std:
                _add_noise(experts, noise_std)
            moe.recorder = recorder
            mlp = UpcycledMLP(moe)
            mlp.train(ffn.training)
            setattr(plan.layers[index], name, mlp)  # the dense FFN goes: its weights live on only in the copies
    return mark_crafted(model, plan, recorder, "upcycle")


def upcycled_layers(model: nn.Module) -> list[tuple[int, UpcycledMLP]]:
    """`[(layer_index, upcycled_mlp), ...]` for every upcycled layer."""
    from ..craft import find_decoder_layers

    _, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        found = [child for child in layer.children() if is_upcycled_mlp(child)]
        if found:
            out.append((i, found[0]))
    return out


def dense_ffn_state(model: nn.Module, expert: int = 0) -> dict[str, torch.Tensor]:
    """Dense-FFN state-dict entries for every upcycled layer, taken from expert `expert` (copies, on the CPU).

    For writing the base of an upcycled model as a complete plain transformers checkpoint: its own FFN keys
    (`...mlp.gate_proj.weight`, ...) are gone from the model, and loading replaces them with the saved experts.
    """
    state = {}
    for name, module in model.named_modules():
        if not is_upcycled_mlp(module):
            continue
        experts = module.moe.experts
        if isinstance(experts, CopiedExperts):
            parts = dict(experts[expert].state_dict())
        else:
            gate_up, inter = experts.gate_up_proj[expert], experts.down_proj.shape[-1]
            parts = {"gate_up_proj.weight": gate_up} if experts.fused else {
                "gate_proj.weight": gate_up[:inter], "up_proj.weight": gate_up[inter:]}
            parts["down_proj.weight"] = experts.down_proj[expert]
        # clones: views of one stacked tensor would be treated as shared storage by checkpoint writers
        state.update({f"{name}.{k}": v.detach().to("cpu").clone() for k, v in parts.items()})
    return state
