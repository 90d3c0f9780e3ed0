"""Recognising a gated MLP `down(act(gate x) * up x)` by its parts, once for every method that needs one.

Sparse Upcycling stacks such an MLP's weights into expert tensors, and LoRA experts call its projections per
expert; both need to know which children are the gate, up (or fused gate_up, gate rows first), down
projections and the activation, and both must be sure the module really computes that function (a family
could hold the same children and do something else), which one probe forward on random input settles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ACTIVATION_NAMES = ("act_fn", "activation_fn")


@dataclass(frozen=True)
class GatedLayout:
    """Attribute names of a gated MLP's parts: separate `gate`/`up` or one fused `gate_up` (gate rows first)."""

    down: str
    act: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        parts = (self.gate_up,) if self.gate_up else (self.gate, self.up)
        return (*parts, self.down)


def is_linear_like(module: nn.Module | None) -> bool:
    """Has integer `in_features` / `out_features`: nn.Linear, bitsandbytes Linear4bit, a peft LoRA wrapper."""
    return module is not None and isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def run_gated(mlp: nn.Module, layout: GatedLayout, x: torch.Tensor) -> torch.Tensor:
    """`down(act(gate x) * up x)` through the MLP's own child modules; `x: [N, h]` -> `[N, h]`."""
    act = getattr(mlp, layout.act)
    if layout.gate_up:
        g, u = getattr(mlp, layout.gate_up)(x).chunk(2, dim=-1)
    else:
        g, u = getattr(mlp, layout.gate)(x), getattr(mlp, layout.up)(x)
    return getattr(mlp, layout.down)(act(g) * u)


def gated_layout(ffn: nn.Module, hidden: int) -> GatedLayout | None:
    """The layout of `ffn` when it computes `down(act(gate x) * up x)` from linear-like children (plain, 4-bit
    or LoRA-wrapped) and nothing else, else None. Checked by names and shapes, then by one probe forward
    (skipped on the meta device)."""
    children = dict(ffn.named_children())
    act = next((n for n in ACTIVATION_NAMES if isinstance(children.get(n), nn.Module)), None)
    if act is None or not is_linear_like(children.get("down_proj")):
        return None
    if is_linear_like(children.get("gate_up_proj")):
        layout = GatedLayout(down="down_proj", act=act, gate_up="gate_up_proj")
    elif is_linear_like(children.get("gate_proj")) and is_linear_like(children.get("up_proj")):
        layout = GatedLayout(down="down_proj", act=act, gate="gate_proj", up="up_proj")
    else:
        return None
    if set(children) != {*layout.projections, act}:
        return None  # other children (dropout, norms) whose effect a per-expert form would drop
    down = children["down_proj"]
    inter = down.in_features
    if down.out_features != hidden:
        return None
    if layout.gate_up:
        if (children["gate_up_proj"].in_features, children["gate_up_proj"].out_features) != (hidden, 2 * inter):
            return None
    elif any((children[n].in_features, children[n].out_features) != (hidden, inter) for n in ("gate_proj", "up_proj")):
        return None
    weight = next(ffn.parameters(), None)
    if weight is None or weight.is_meta:
        return layout
    with torch.no_grad():  # the probe: the same children could still hide another forward
        dtype = next((p.dtype for p in ffn.parameters() if p.is_floating_point()), torch.float32)
        x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0)).to(weight.device, dtype)
        want = ffn(x).float()
        got = run_gated(ffn, layout, x).float()
    if not torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-6):
        return None
    return layout


def _plain_linear(module: nn.Module | None) -> bool:
    return type(module) is nn.Linear and module.bias is None  # subclasses (4-bit, LoRA) excluded


def gated_weights(ffn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module, bool] | None:
    """`(gate_up [2i, h], down [h, i], act_fn, fused)` when `ffn` is a gated MLP of plain bias-free `nn.Linear`s
    (so its weights can be stacked), else None. `fused`: the MLP has one `gate_up_proj` (Phi-3)."""
    down = getattr(ffn, "down_proj", None)
    if not _plain_linear(down):
        return None
    layout = gated_layout(ffn, down.out_features)
    if layout is None or not all(_plain_linear(getattr(ffn, p)) for p in layout.projections):
        return None
    if layout.gate_up:
        gate_up = ffn.gate_up_proj.weight
    else:
        gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], 0)
    return gate_up, down.weight, getattr(ffn, layout.act), layout.gate_up is not None


def split_gate_up(gate_up: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
    """A stacked `[2i, h]` gate_up weight under the MLP's own parameter names (`gate_up_proj.weight`, or
    `gate_proj.weight` + `up_proj.weight`, gate rows first)."""
    if fused:
        return {"gate_up_proj.weight": gate_up}
    inter = gate_up.shape[0] // 2
    return {"gate_proj.weight": gate_up[:inter], "up_proj.weight": gate_up[inter:]}


def join_gate_up(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Inverse of `split_gate_up`: `[2i, h]` from `gate_up_proj.weight` or `gate_proj.weight` + `up_proj.weight`."""
    if "gate_up_proj.weight" in weights:
        return weights["gate_up_proj.weight"]
    return torch.cat([weights["gate_proj.weight"], weights["up_proj.weight"]], 0)
