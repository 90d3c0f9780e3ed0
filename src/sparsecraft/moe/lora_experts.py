"""LoRA experts on a shared gated FFN: the MixLoRA form used by UpIT's LoRA setting.

Expert e of a gated MLP `down(act(gate x) * up x)` computes the same MLP with its own LoRA on the chosen
projections, `proj_e(v) = W v + s B_e A_e v` (`s` = alpha/r), and a layer returns `sum_j g_j expert_{e_j}(x)` for
the token's top-k experts. Only the LoRA factors are per expert; the base projections are the MLP's own modules,
called (never read through `.weight`), so they may be plain, NF4 `Linear4bit` or peft-LoRA-wrapped, and every
base state-dict key keeps its name (`model.layers.3.mlp.gate_proj.weight`).

Attached like PESC (`attach_lora_block`; how a model is crafted is `methods/lora_experts.py`): the MLP gets a
child `moe` (`LoraExpertsMoE`: router + stacked LoRA factors) and its class is switched to a cached subclass
whose forward is `self.moe(x, self)`. New keys:
`...mlp.moe.router.weight [E, h]`, `...mlp.moe.experts.A.{proj} [E, r, in]`,
`...mlp.moe.experts.B.{proj} [E, out, r]` (all under `.moe.`, so NF4 quantisation and peft LoRA leave
them alone and they stay fp32 and trainable).

Compute per layer, N tokens, P = N*k (token, slot) pairs sorted by expert (`grouped.place_pairs`; in bf16 on the
CPU each expert's group padded to whole tiles with zero rows, P a little over N*k):

- gate/up base projections once for the N tokens, gathered to the P pairs;
- their LoRA terms via `torch._grouped_mm` on the sorted pairs (`[P, in] x A_e^T -> [P, r] x B_e^T`);
- `a = act(g) * u` per pair; the down base projection once on the N gate-mixed rows `sum_j g_j a_j` (linear in
  its input: k times fewer rows than applying it per pair), the down LoRA term grouped per pair;
- no Python loop over experts (the `sorted` fallback loops over slices where `_grouped_mm` is unavailable, and
  `loop` is the per-expert reference the tests compare against).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import LaneDropout
from .experts import ContiguousGrad, autocast_off, expert_compute_dtype, grouped_mm_available
from .gated import GatedLayout
from .grouped import gather_rows, place_gates, place_pairs, row_multiple, unsort_sum
from .layers import RoutedBlock, RouterSite, switched_class


class LoraExpertWeights(nn.Module):
    """E LoRA factor pairs per target projection: `A[proj]: [E, r, in]`, `B[proj]: [E, out, r]`.

    Named `A`/`B`, not `lora_A`/`lora_B`: peft and parameter reports treat any name containing "lora_" as a peft
    adapter weight (peft's state-dict filters, `report.parameter_report`), and these are expert weights.

    Initialised as peft does one LoRA (A Kaiming-uniform per expert, B = 0), so a fresh block adds nothing.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        num_experts: int,
        rank: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.A = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(num_experts, rank, i, **kw)) for p, (_, i) in shapes.items()})
        self.B = nn.ParameterDict(
            {p: nn.Parameter(torch.empty(num_experts, o, rank, **kw)) for p, (o, _) in shapes.items()})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for a, b in zip(self.A.values(), self.B.values()):
                if a.is_meta:
                    continue
                for w in a.unbind(0):
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                b.zero_()

    @property
    def num_experts(self) -> int:
        return next(iter(self.A.values())).shape[0]

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.A.values())).dtype

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rank={self.rank}, targets={list(self.A)}"

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert `e` as `{"{proj}.lora_A": [r, in], "{proj}.lora_B": [out, r]}` (views; peft's names for one
        LoRA, which is what one expert is)."""
        out = {f"{p}.lora_A": a[e] for p, a in self.A.items()}
        out.update({f"{p}.lora_B": b[e] for p, b in self.B.items()})
        return out

    @torch.no_grad()
    def set_expert_weights(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        """Write `expert_weights` names into expert `e`."""
        for proj in self.A:
            for param, name in ((self.A[proj], f"{proj}.lora_A"), (self.B[proj], f"{proj}.lora_B")):
                param[e].copy_(weights[name].to(device=param.device, dtype=param.dtype))


class LoraExpertsMoE(RoutedBlock):
    """Router `[E, h]` on the MLP input + per-expert LoRA on the MLP's own projections.

    `forward(x: [..., h], mlp) -> [..., h]`: `sum_j g_j expert_{e_j}(x)`, `mlp` being the module this block is
    attached to (its projections are called, not stored here, so their keys stay outside `.moe.`).
    """

    def __init__(self, site: RouterSite, layout: GatedLayout, shapes: dict[str, tuple[int, int]]) -> None:
        """`shapes`: `{projection: (out, in)}` of the projections that get per-expert LoRA."""
        super().__init__(site)
        cfg = site.config
        self.layout = layout
        # LoRA factors are fp32 whatever the model dtype: they are what trains (as peft keeps LoRA in fp32)
        self.experts = LoraExpertWeights(shapes, cfg.num_experts, cfg.adapter_dim, site.device, torch.float32)
        self.dropout = LaneDropout(cfg.dropout)

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def forward(self, x: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        gates, indices = self.route_tokens(x_flat, shape)
        if self.config.dispatch == "loop":
            out = self._loop(x_flat, gates, indices, mlp)
        else:
            out = self._sorted(x_flat, gates, indices, mlp, grouped=self.config.dispatch != "sorted")
        return out.view(*shape[:-1], out.shape[-1])

    def _lora_dtype(self, activations: torch.Tensor) -> torch.dtype:
        return expert_compute_dtype(activations, self.experts.dtype)

    def _lora(self, proj: str, v: torch.Tensor, offs: torch.Tensor,
              gate: torch.Tensor | None, grouped: bool) -> torch.Tensor:
        """`s * B_e A_e v` for sorted rows `v: [P, in]` (expert e's rows end at `offs[e]`) -> `[P, out]`.

        `gate [P, 1]` (optional) multiplies the rank-r intermediate: by linearity the same as gating the output,
        `out/r` times fewer multiplications."""
        with autocast_off(v):
            return self._lora_terms(proj, v, offs, gate, grouped)

    def _lora_terms(self, proj: str, v: torch.Tensor, offs: torch.Tensor,
                    gate: torch.Tensor | None, grouped: bool) -> torch.Tensor:
        a = self.experts.A[proj].to(v.dtype)
        b = self.experts.B[proj].to(v.dtype)
        gate = gate if gate is None else gate.to(v.dtype)
        rows = v.shape[0]
        if grouped and grouped_mm_available(v, rows, a.shape[1]) and (b.shape[1] * v.element_size()) % 16 == 0:
            t = ContiguousGrad.apply(torch._grouped_mm(v, a.transpose(1, 2), offs=offs))
            t = t * (self.scaling if gate is None else gate * self.scaling)
            return ContiguousGrad.apply(torch._grouped_mm(t, b.transpose(1, 2), offs=offs))
        # fallback where `_grouped_mm` cannot run: a loop over the experts' contiguous slices
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
        scale = v.new_full((rows, 1), self.scaling) if gate is None else gate * self.scaling
        pieces = [
            F.linear(F.linear(ve, ae) * se, be)
            for ve, se, ae, be in zip(v.split(counts), scale.split(counts), a.unbind(0), b.unbind(0))
        ]
        return torch.cat(pieces, 0) if pieces else v.new_zeros(0, b.shape[1])

    def _sorted(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, mlp: nn.Module,
                grouped: bool) -> torch.Tensor:
        """Grouped (or sliced-loop) form; `x: [N, h]`, `gates, indices: [N, k]` -> `[N, h]`."""
        lay, targets = self.layout, self.experts.A
        num_tokens, k = indices.shape
        dtype = self._lora_dtype(x)
        # grouped matmuls in bf16 on the CPU get groups of whole tiles (grouped.row_multiple); spare rows read zeros
        multiple = row_multiple(dtype, x.device) if grouped else 1
        rows, source, spare, offs = place_pairs(indices, self.config.num_experts, multiple)
        gate = place_gates(gates, rows, source.numel()).unsqueeze(-1)  # [P, 1], router dtype
        rows = rows.reshape(-1)
        # dropout once per token on the LoRA input, shared by its k experts (as PESC does)
        lora_in = gather_rows(self.dropout(x.to(dtype)), source, spare) if any(
            p in targets for p in lay.projections[:-1]) else None

        def project(name: str) -> torch.Tensor:
            y = gather_rows(getattr(mlp, name)(x), source, spare)  # base once per token, gathered to the pairs
            if name in targets:
                y = y + self._lora(name, lora_in, offs, None, grouped).to(y.dtype)
            return y

        act = getattr(mlp, lay.act)
        if lay.gate_up:
            g, u = project(lay.gate_up).chunk(2, dim=-1)
        else:
            g, u = project(lay.gate), project(lay.up)
        a = act(g) * u  # [P, i]
        # down is linear: sum_j g_j W a_j = W (sum_j g_j a_j), so the base matmul runs on N rows, not N*k
        mixed = unsort_sum(a * gate.to(a.dtype), rows, num_tokens, k)
        down = getattr(mlp, lay.down)
        out = down(mixed)
        bias = getattr(down, "bias", None)
        if isinstance(bias, torch.Tensor):
            # each expert adds the bias once, weighted by its gate: (sum_j g_j) b, of which down() added one b
            out = out + (gates.sum(-1, keepdim=True) - 1).to(out.dtype) * bias.to(out.dtype)
        if lay.down in targets:
            delta = self._lora(lay.down, self.dropout(a.to(dtype)), offs, gate.to(dtype), grouped)
            out = out + unsort_sum(delta, rows, num_tokens, k).to(out.dtype)
        return out

    def _loop(self, x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        """Reference: each expert's full MLP on its tokens, one expert at a time, outputs gated and summed."""
        lay, experts, s = self.layout, self.experts, self.scaling
        dtype = self._lora_dtype(x)
        out = None
        for e in range(self.config.num_experts):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue

            def project(name: str, v: torch.Tensor, e: int = e) -> torch.Tensor:
                y = getattr(mlp, name)(v)
                if name in experts.A:
                    a = experts.A[name][e].to(dtype)
                    b = experts.B[name][e].to(dtype)
                    y = y + (s * F.linear(F.linear(self.dropout(v.to(dtype)), a), b)).to(y.dtype)
                return y

            xe = x.index_select(0, token)
            if lay.gate_up:
                g, u = project(lay.gate_up, xe).chunk(2, dim=-1)
            else:
                g, u = project(lay.gate, xe), project(lay.up, xe)
            y = project(lay.down, getattr(mlp, lay.act)(g) * u)
            y = y * gates[token, slot].unsqueeze(-1).to(y.dtype)
            out = (y.new_zeros(x.shape[0], y.shape[-1]) if out is None else out).index_add(0, token, y)
        return out if out is not None else torch.zeros_like(x)


def _lora_mlp_forward(self, x, *args, **kwargs):
    return self.moe(x, self)


def attach_lora_block(mlp: nn.Module, moe: "LoraExpertsMoE") -> None:
    """Give `mlp` its LoRA experts in place: adds `mlp.moe` and switches to a class whose forward is
    `self.moe(x, self)`."""
    mlp.add_module("moe", moe)
    mlp.__class__ = switched_class("LoraExperts", type(mlp), _lora_mlp_forward)


def is_lora_experts_mlp(module: nn.Module) -> bool:
    return hasattr(type(module), "_sparsecraft_base_class") and isinstance(getattr(module, "moe", None),
                                                                           LoraExpertsMoE)
