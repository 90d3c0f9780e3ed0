"""LoRA experts on the shared gated MLP (the MixLoRA form, `moe.lora_experts.LoraExpertsMoE`): expert e is the
MLP with its own LoRA on the projections named in `CraftConfig.extra["lora_targets"]`.

This is what UpIT's `lora` expert kind builds (one trained LoRA per expert, keys `layers.{i}.{proj}.lora_A
[r, in]` / `.lora_B [out, r]`) and the layer `mixlora` crafts from scratch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..errors import ConfigError, CraftError
from ..moe.gated import GatedLayout, gated_layout
from ..moe.layers import RouterSite
from ..moe.lora_experts import LoraExpertsMoE, attach_lora_block
from ..surgery import (
    LayerPlan,
    find_decoder_layers,
    find_ffn,
    install_blocks,
    plan_layers,
    text_config,
)
from .base import Method
from .expert_keys import by_layer

TARGETS_KEY = "lora_targets"  # CraftConfig.extra entry: the projections that carry per-expert LoRA


def lora_targets_of(config: CraftConfig) -> list[str]:
    """The projections carrying per-expert LoRA (`config.extra["lora_targets"]`); ConfigError when unset."""
    targets = config.extra.get(TARGETS_KEY)
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"LoRA experts need extra.{TARGETS_KEY}: a non-empty list of MLP projection names, got {targets!r}")
    return list(targets)


def gated_layouts(plan: LayerPlan, verb: str) -> list[tuple[int, nn.Module, GatedLayout]]:
    """`(layer, mlp, layout)` of every planned layer; CraftError naming the first MLP that is not gated."""
    out = []
    for index, name, ffn in plan.targets:
        layout = gated_layout(ffn, plan.hidden)
        if layout is None:
            raise CraftError(
                f"cannot {verb} layer {index}: its '{name}' ({type(ffn).__name__}) is not a gated MLP "
                "with gate_proj/up_proj (or gate_up_proj), down_proj and act_fn"
            )
        out.append((index, ffn, layout))
    return out


def _lora_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    ranks = {v[0] for k, v in shapes.items() if k.endswith(".lora_A")}
    ranks |= {v[1] for k, v in shapes.items() if k.endswith(".lora_B")}
    if len(ranks) != 1:
        raise ConfigError(f"LoRA experts must share one rank; found ranks {sorted(ranks)}")
    return ranks.pop()


class LoraExpertsMethod(Method):
    name = "lora_experts"
    title = "LoRA experts"
    expert_kind = "lora"
    crafts_from_base = False  # needs extra.lora_targets from an expert set; `mixlora` crafts this layer alone
    added_parts = ("routers", "experts")
    upit_dense_method = "dense"  # LoRA on the FFN projections; attention LoRA off unless asked for
    upit_dense_recipe = {"lora": {"enabled": True, "ffn": True}}
    upit_defaults = {"common": {"quantization": "none"}, "prepare": {"lora": {"targets": []}},
                     "upcycle": {"lora": {"enabled": False}, "optim": {"lr": 2e-4}}}
    upit_existing = "peft"
    upit_ffn_lora_is_expert = True
    factored_experts = True

    def targets_for(self, config: CraftConfig, layouts: list[tuple[int, nn.Module, GatedLayout]]) -> list[str]:
        """The projections that get per-expert LoRA: here always `extra["lora_targets"]`."""
        return lora_targets_of(config)

    def craft(self, model: nn.Module, config: CraftConfig | None = None, *, seed: int | None = None,
              adapter_dtype: torch.dtype | None = None, **overrides) -> nn.Module:
        """Give the chosen gated MLPs E per-expert LoRAs and a router, in place.

        `config`: `num_experts`, `top_k`, `adapter_dim` (LoRA rank r), `scaling` (alpha/r), `dropout` (on the LoRA
        input), routing/router/loss settings, `layers`, `dispatch` (`loop`: per-expert reference, `sorted`:
        sliced loop, else grouped). `seed` seeds router and A (B = 0, so the model computes what the dense one
        did, up to the rounding of gates summing to 1). LoRA factors are fp32 whatever `adapter_dtype`.
        """
        plan = plan_layers(model, config, overrides, verb=f"add {self.title} to")
        layouts = gated_layouts(plan, f"add {self.title} to")
        targets = self.targets_for(plan.config, layouts)
        plan.config.extra = {**plan.config.extra, TARGETS_KEY: list(targets)}  # saved, so loading rebuilds these
        blocks = {}
        for index, ffn, layout in layouts:  # check every layer before changing any
            unknown = [t for t in targets if t not in layout.projections]
            if unknown:
                raise ConfigError(f"LoRA expert target {unknown[0]!r} is not a projection of layer {index}'s MLP "
                                  f"(has {', '.join(layout.projections)})")
            blocks[index] = (layout, {t: (getattr(ffn, t).out_features, getattr(ffn, t).in_features)
                                      for t in targets})
        return install_blocks(model, plan, self.name, seed,
                              lambda index, ffn, site: LoraExpertsMoE(site, *blocks[index]),
                              lambda index, name, ffn, moe: attach_lora_block(ffn, moe))

    def moe_bytes_per_token(self, shape, num_tokens: int) -> tuple[int, str]:
        router, _ = super().moe_bytes_per_token(shape, num_tokens)
        a, h, i, k, r = shape.act_bytes, shape.hidden, shape.intermediate, shape.top_k, shape.adapter_dim
        # per slot: gathered gate/up (2i), act·up (i), LoRA input h and three rank-r intermediates
        return router + a * k * (3 * i + h + 3 * r), "LoRA experts 4E+12k + 2k(3i+h+3r)"

    def expert_macs(self, hidden: int, ffn_macs: int, rank: int) -> int:
        inter = ffn_macs // (3 * hidden)  # a gated FFN: gate and up [h -> i], down [i -> h]
        return 3 * rank * (hidden + inter)  # a LoRA pair on each of the three projections

    def standalone_block(self, ffn: nn.Module, hidden: int, config: CraftConfig, *, device=None, dtype=None):
        layout = gated_layout(ffn, hidden)
        if layout is None:
            raise CraftError(f"{self.title} needs a gated MLP; {type(ffn).__name__} is not one")
        targets = self.targets_for(config, [(0, ffn, layout)])
        config = CraftConfig.from_dict({**config.to_dict(), "extra": {**config.extra, TARGETS_KEY: targets}})
        shapes = {t: (getattr(ffn, t).out_features, getattr(ffn, t).in_features) for t in targets}
        moe = LoraExpertsMoE(RouterSite(hidden, config, device=device), layout, shapes)
        return moe, (lambda x: moe(x, ffn))

    # ------------------------------------------------------------------ UpIT expert sets

    def check_expert_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        bad = next((k for k in shapes if not k.endswith((".lora_A", ".lora_B"))), None)
        if bad is not None:
            raise ConfigError(f"LoRA expert key {bad!r} must end in .lora_A or .lora_B")
        _lora_rank(shapes)

    def derived_settings(self, experts) -> dict:
        shapes = {k: tuple(v.shape) for k, v in experts.base.items()}
        rank = _lora_rank(shapes)
        if "scaling" in experts.meta:
            scaling = float(experts.meta["scaling"])
        elif "alpha" in experts.meta:
            scaling = float(experts.meta["alpha"]) / rank
        else:
            raise ConfigError("LoRA expert set meta needs 'scaling' or 'alpha' (delta W = scaling * B @ A)")
        per_layer = by_layer(experts.base)
        targets = sorted({rest.rsplit(".", 1)[0] for rest in next(iter(per_layer.values()))})
        for layer, rests in per_layer.items():
            want = {f"{t}.{ab}" for t in targets for ab in ("lora_A", "lora_B")}
            if set(rests) != want:
                raise ConfigError(f"LoRA experts must cover the same projections (A and B) in every layer; layer "
                                  f"{layer} has {sorted(rests)}")
        return {"adapter_dim": rank, "scaling": scaling, "extra": {TARGETS_KEY: targets}}

    def read_expert_state(self, model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
        """Every MLP projection's peft LoRA named `adapter` in a LoRA-wrapped dense model."""
        out = {}
        for i, ffn in _mlps(model):
            for name, module in ffn.named_children():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
                    out[f"layers.{i}.{name}.lora_A"] = lora_a[adapter].weight
                    out[f"layers.{i}.{name}.lora_B"] = module.lora_B[adapter].weight
        return out

    def expert_meta(self, model: nn.Module, config: CraftConfig | None = None, adapter: str = "default") -> dict:
        """`{"r", "alpha", "scaling", "targets"}` of the MLP LoRA in a peft-wrapped dense model."""
        found = {}
        for _, ffn in _mlps(model):
            for name, module in ffn.named_children():
                if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and adapter in module.lora_A:
                    found[name] = (module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter])
        if not found:
            raise ConfigError(f"found no MLP LoRA named {adapter!r} in {type(model).__name__}")
        if len(set(found.values())) != 1:
            raise ConfigError(f"MLP LoRAs differ in rank/alpha across projections: {found}")
        r, alpha, scaling = next(iter(found.values()))
        return {"r": int(r), "alpha": float(alpha), "scaling": float(scaling), "targets": sorted(found)}


def _mlps(model: nn.Module) -> list[tuple[int, nn.Module]]:
    _, layers = find_decoder_layers(model)
    hidden = text_config(model).hidden_size
    return [(i, find_ffn(layer, hidden)[1]) for i, layer in enumerate(layers)]
