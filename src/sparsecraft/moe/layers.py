"""The PESC MoE block and how it attaches to a model's own FFN module.

The block is one function of (FFN input `x`, FFN output `F`): it never computes the FFN itself, so it works for
any family's MLP (SwiGLU, GeGLU, fused gate_up, 4-bit or LoRA-wrapped). It is attached by adding a `moe`
child to the existing MLP module and switching that module to a subclass whose forward is
`moe(x, super().forward(x))`. State-dict keys of the base weights stay exactly as they were.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import CraftConfig
from .adapter_weights import AdapterExperts
from .dropout import LaneDropout
from .dropout import dropout as lane_dropout
from .experts import dispatch, expert_compute_dtype
from .router import route


@dataclass
class RoutingRecord:
    """Routing of one MoE layer in one forward: logits `[N, E]` fp32, indices `[N, k]`, the gates `[N, k]` the
    block used (detached), N = B*T tokens.

    `router_input` (the detached router input, in the router's compute dtype) and `router_weight` are kept only
    when the logits were computed without autograd while the router trains, which is what happens inside a
    reentrant gradient checkpoint (its forward runs under `no_grad`); `logits_for_loss` then recomputes the
    logits so that the balance loss still reaches the router weight.
    """

    layer: int
    logits: torch.Tensor
    indices: torch.Tensor
    num_tokens_per_row: int
    gates: torch.Tensor | None = None
    router_input: torch.Tensor | None = None
    router_weight: torch.Tensor | None = None

    def logits_for_loss(self) -> torch.Tensor:
        """The fp32 logits for the router losses, with a gradient w.r.t. the router whenever one is possible."""
        if (
            self.router_input is not None
            and self.router_weight is not None
            and not self.logits.requires_grad
            and torch.is_grad_enabled()
        ):
            weight = self.router_weight.to(self.router_input.dtype)
            return torch.nn.functional.linear(self.router_input, weight).float()
        return self.logits


@dataclass
class RoutingRecorder:
    """Collects every crafted layer's routing during one top-level forward (shared by all layers of a model).

    Only active between `start` and `stop`, so recomputation during gradient-checkpointed backward records
    nothing.
    """

    active: bool = False
    records: list = field(default_factory=list)
    # set by the training loop under multi-process training: router losses over the global batch
    sync_across_processes: bool = False
    # `balance: global`: per layer, (expert counts [E], tokens) of the optimizer step's earlier micro-batches
    step_counts: dict = field(default_factory=dict)

    def new_step(self) -> None:
        """An optimizer step begins: global balance counts start again (the training loop calls it)."""
        self.step_counts = {}

    def start(self) -> None:
        self.records = []
        self.active = True

    def stop(self) -> list:
        self.active = False
        records, self.records = self.records, []
        return records


@dataclass
class RouterSite:
    """Where a MoE block sits and how its router is made: the FFN input width, the crafting settings, the decoder
    layer index (what routing records carry), and the router's device and dtype."""

    hidden_size: int
    config: CraftConfig
    layer_index: int = 0
    device: torch.device | str | None = None
    router_dtype: torch.dtype = torch.float32


class RoutedBlock(nn.Module):
    """What every MoE block shares: the router `[E, h]` on the FFN input and recording its routing for the
    model-level losses (`PescMoE` adds adapter experts, `upcycle.UpcycledMoE` FFN copies, `lora_experts.
    LoraExpertsMoE` LoRA experts)."""

    def __init__(self, site: RouterSite) -> None:
        super().__init__()
        self.config = site.config
        self.layer_index = site.layer_index
        self.router = nn.Linear(site.hidden_size, site.config.num_experts, bias=False, device=site.device,
                                dtype=site.router_dtype)
        self.recorder: RoutingRecorder | None = None
        if site.config.bias_balance:
            # moved by rule, not by gradients (see `moe.balance`); a buffer, so that sharded engines (FSDP,
            # DeepSpeed ZeRO) keep it whole on every rank, and saved and loaded with the model's weights
            self.register_buffer("router_bias", torch.zeros(site.config.num_experts, device=site.device,
                                                            dtype=torch.float32))

    def route_tokens(self, x_flat: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Route `x_flat: [N, h]` and record the routing; returns gates `[N, k]` and expert indices `[N, k]`."""
        cfg = self.config
        gates, indices, logits = route(x_flat, self.router.weight, cfg.top_k, cfg.routing, cfg.normalize_topk,
                                       router_compute_dtype(cfg, x_flat), getattr(self, "router_bias", None))
        self.record_routing(x_flat, shape, gates, indices, logits)
        return gates, indices

    def record_routing(self, x_flat: torch.Tensor, shape: torch.Size, gates: torch.Tensor, indices: torch.Tensor,
                       logits: torch.Tensor) -> None:
        """Hand one call's routing (logits `[N, E]` fp32, indices and gates `[N, k]`) to the model's recorder."""
        recorder = self.recorder
        if recorder is not None and recorder.active:
            record = RoutingRecord(self.layer_index, logits, indices, shape[-2] if len(shape) > 2 else shape[0],
                                   gates.detach())
            if not logits.requires_grad and self.training and self.router.weight.requires_grad:
                # Inside a reentrant checkpoint (forward under no_grad): keep what recomputing the logits needs.
                record.router_input = x_flat.detach().to(router_compute_dtype(self.config, x_flat))
                record.router_weight = self.router.weight
            recorder.records.append(record)


def router_compute_dtype(cfg: CraftConfig, x: torch.Tensor) -> torch.dtype:
    return torch.float32 if cfg.router_dtype == "float32" else x.dtype


def pesc_math(x_flat: torch.Tensor, f_flat: torch.Tensor, router_weight: torch.Tensor,
              router_bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor, cfg: CraftConfig,
              dropout: float, training: bool, compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """One PESC block call as a pure function (what `compile_moe_blocks` compiles, once for every layer).

    Args:
        x_flat: FFN input `[N, h]`; f_flat: FFN output `[N, h]`; router_weight `[E, h]`; router_bias `[E]`;
            down `[E, r, h]`, up `[E, h, r]` (storage dtype); compute_dtype: the adapters' (None: as
            `expert_compute_dtype` decides from the activations and weights).

    Returns:
        out `[N, h]` (f_flat's dtype), gates `[N, k]`, indices `[N, k]`, router logits `[N, E]` fp32.
    """
    gates, indices, logits = route(x_flat, router_weight, cfg.top_k, cfg.routing, cfg.normalize_topk,
                                   router_compute_dtype(cfg, x_flat), router_bias)
    dtype = compute_dtype or expert_compute_dtype(f_flat, down.dtype)
    adapter_in = lane_dropout(f_flat.to(dtype), dropout, training)
    if cfg.combine == "per_slot" and f_flat.dtype != torch.float32:
        out = _per_slot_combine(f_flat, adapter_in, gates, indices, down.to(dtype), up.to(dtype), cfg)
    else:  # in fp32 sum_j g_j (F + A_j) and F + sum_j g_j A_j agree to rounding: one dispatch for all slots
        delta = dispatch(adapter_in, gates, indices, down.to(dtype), up.to(dtype), cfg.activation, cfg.scaling,
                         cfg.dispatch)
        if torch.promote_types(f_flat.dtype, delta.dtype) != f_flat.dtype:
            delta = delta.to(f_flat.dtype)
        out = f_flat + delta  # bf16 adapters on an fp32 F: promoted inside the add, no separate cast pass
    return out, gates, indices, logits


def _per_slot_combine(f_flat: torch.Tensor, adapter_in: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor,
                      down: torch.Tensor, up: torch.Tensor, cfg: CraftConfig) -> torch.Tensor:
    """`sum_j g_j (F + A_j(F))` rounded as the published code computes it in bf16/fp16: each slot's term
    `g_j * (F + s A_j)` in the model dtype, accumulated from zero in expert order (its per-expert `index_add`).
    In bf16 the gates of a token rarely sum to exactly 1, so this differs from `F + sum_j g_j A_j` by up to an ulp
    (tests/test_craft.py). One dispatch per slot: only imports of published models use it.

    Shapes: f_flat, adapter_in `[N, h]`; gates, indices `[N, k]`; returns `[N, h]` in f_flat's dtype."""
    order = indices.argsort(dim=-1)  # each token's slots by expert index: the reference adds experts in order
    ones = torch.ones_like(gates[:, :1])
    out = torch.zeros_like(f_flat)
    for j in range(indices.shape[-1]):
        slot = order[:, j:j + 1]
        adapter = dispatch(adapter_in, ones, indices.gather(1, slot), down, up, cfg.activation, cfg.scaling,
                           cfg.dispatch).to(f_flat.dtype)
        out = out + gates.gather(1, slot).to(f_flat.dtype) * (f_flat + adapter)
    return out


@functools.cache
def compiled_pesc_math():
    """`pesc_math` under torch.compile (dynamic shapes), made once per process and shared by every block."""
    return torch.compile(pesc_math, dynamic=True)


class PescMoE(RoutedBlock):
    """Router + adapter experts on a shared FFN output.

    `forward(x, ffn_out)` with `x, ffn_out: [..., h]` returns `ffn_out + s * sum_j g_j A_j(dropout(ffn_out))`
    (or the per-slot form, see `CraftConfig.combine`).
    """

    def __init__(self, site: RouterSite, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the adapters' (default: torch's default dtype)."""
        super().__init__(site)
        cfg = site.config
        self.experts = AdapterExperts(cfg.num_experts, site.hidden_size, cfg.adapter_dim, site.device, dtype)
        self.dropout = LaneDropout(cfg.dropout)  # its rate; `pesc_math` draws the mask (moe/dropout.py)
        self.compiled = False  # run `pesc_math` compiled (`moe.compiled.compile_moe_blocks`)
        # set for training whose base computes in bf16 (`set_adapter_compute_dtype`): an NF4 base hands its output
        # back in fp32 on the CPU, so the activations alone do not say it
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, ffn_out: torch.Tensor) -> torch.Tensor:
        shape = ffn_out.shape
        x_flat = x.reshape(-1, shape[-1])
        math = compiled_pesc_math() if self.compiled else pesc_math
        out, gates, indices, logits = math(x_flat, ffn_out.reshape(-1, shape[-1]), self.router.weight,
                                           getattr(self, "router_bias", None), self.experts.down, self.experts.up,
                                           self.config, self.dropout.p, self.training, self.compute_dtype)
        self.record_routing(x_flat, shape, gates, indices, logits)
        return out.view(shape)


def set_adapter_compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Let every PESC block's adapters compute in `dtype` (their fp32 weights cast differentiably per call, the
    result added to the FFN output in its own dtype); None restores the default. Returns the number of blocks."""
    blocks = [m for m in model.modules() if isinstance(m, PescMoE)]
    for block in blocks:
        block.compute_dtype = dtype
    return len(blocks)


def is_moe_mlp(module: nn.Module) -> bool:
    """Whether `module` is an MLP that carries a MoE block (any method) as its `moe` child."""
    return isinstance(getattr(module, "moe", None), RoutedBlock)


_SWITCHED_CLASSES: dict[tuple[str, type], type] = {}


def switched_class(prefix: str, base_cls: type, forward) -> type:
    """`{prefix}{Base}`: a subclass of an MLP class with another `forward`, cached per (prefix, base class).

    Switching an instance's class (rather than wrapping it) keeps its weights' state-dict keys and
    `isinstance(mlp, Base)`; `_sparsecraft_base_class` records the class to switch back to."""
    key = (prefix, base_cls)
    if key not in _SWITCHED_CLASSES:
        _SWITCHED_CLASSES[key] = type(
            f"{prefix}{base_cls.__name__}",
            (base_cls,),
            {"forward": forward, "_sparsecraft_base_class": base_cls, "__module__": forward.__module__},
        )
    return _SWITCHED_CLASSES[key]


def _pesc_mlp_forward(self, x, *args, **kwargs):
    ffn_out = super(type(self), self).forward(x, *args, **kwargs)
    if not isinstance(ffn_out, torch.Tensor):
        raise TypeError(
            f"{type(self).__mro__[1].__name__}.forward returned {type(ffn_out).__name__}; PESC needs an FFN "
            "that returns one tensor"
        )
    return self.moe(x, ffn_out)


def pesc_mlp_class(base_cls: type) -> type:
    """The subclass of an MLP class whose forward adds the PESC experts (cached, one per base class)."""
    return switched_class("Pesc", base_cls, _pesc_mlp_forward)


def attach_pesc(mlp: nn.Module, moe: PescMoE) -> None:
    """Turn `mlp` into a PESC block in place: adds `mlp.moe` and swaps its class."""
    mlp.add_module("moe", moe)
    mlp.__class__ = pesc_mlp_class(type(mlp))


def is_pesc_mlp(module: nn.Module) -> bool:
    return hasattr(type(module), "_sparsecraft_base_class") and isinstance(getattr(module, "moe", None), PescMoE)


def detach_moe(mlp: nn.Module) -> RoutedBlock:
    """Undo an attach (PESC or LoRA experts): restore the original class and return the removed `moe` block."""
    moe = mlp.moe
    mlp.__class__ = type(mlp)._sparsecraft_base_class
    del mlp._modules["moe"]
    return moe
