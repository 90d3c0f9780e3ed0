"""PESC (Parameter-Efficient Sparsity Crafting, arXiv 2401.02731): bottleneck-adapter experts on the output of
each chosen FFN, which is kept and computed once per token (the block is `moe.layers.PescMoE`).

UpIT's `adapter` expert kind builds this MoE: one trained adapter per expert, keys `layers.{i}.down [r, h]` and
`layers.{i}.up [h, r]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..errors import ConfigError
from ..moe.experts import path_by_shape
from ..moe.layers import PescMoE, RouterSite, attach_pesc
from ..surgery import crafted_layers, install_blocks, plan_layers
from .base import Method
from .expert_keys import by_layer


class PescMethod(Method):
    name = "pesc"
    title = "PESC"
    expert_kind = "adapter"
    added_parts = ("routers", "adapters")
    dense_path_runs_all = True
    upit_dense_method = "pesc"  # one always-chosen adapter
    upit_defaults = {"common": {"quantization": "none"}, "prepare": {"lora": {"enabled": False}},
                     "upcycle": {"lora": {"enabled": False}, "optim": {"lr": 2e-4}}}

    def craft(self, model: nn.Module, config: CraftConfig | None = None, *, seed: int | None = None,
              adapter_dtype: torch.dtype | None = None, **overrides) -> nn.Module:
        """Turn the chosen FFNs of a transformers causal LM into PESC MoE blocks, in place.

        `seed` seeds the router and `W_down` initialisation (`W_up` is zero regardless, so the crafted model
        computes exactly what the dense one did); `adapter_dtype` defaults to the model's floating dtype.
        """
        plan = plan_layers(model, config, overrides)
        dtype = adapter_dtype or plan.model_dtype
        return install_blocks(model, plan, self.name, seed, lambda index, ffn, site: PescMoE(site, dtype),
                              lambda index, name, ffn, moe: attach_pesc(ffn, moe))

    def moe_bytes_per_token(self, shape, num_tokens: int) -> tuple[int, str]:
        router, _ = super().moe_bytes_per_token(shape, num_tokens)
        a, h, e, k, r = shape.act_bytes, shape.hidden, shape.num_experts, shape.top_k, shape.adapter_dim
        total = router
        if shape.adapter_dropout > 0:
            total += a * h + h  # dropout(F) and its bool mask
        path = path_by_shape(shape.dispatch, num_tokens, e, k, r)
        if path == "dense":
            total += a * (3 * e * r + e)  # every expert: W_down·x, act, gated act (E·r each) + gate mask [E]
        else:
            total += a * k * (2 * h + 3 * r)  # per slot: gathered input h, W_down·x, act, gated act (r), W_up·… h
        return total, "PESC 4E+12k+3h + 2k(2h+3r) [dense path: 2E(3r+1)]"

    def expert_macs(self, hidden: int, ffn_macs: int, rank: int) -> int:
        return 2 * hidden * rank  # down [h -> r] + up [r -> h]

    def standalone_block(self, ffn: nn.Module, hidden: int, config: CraftConfig, *, device=None, dtype=None):
        moe = PescMoE(RouterSite(hidden, config, device=device), dtype)
        return moe, (lambda x: moe(x, ffn(x)))

    def check_expert_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for layer, rests in by_layer(shapes).items():
            if set(rests) != {"down", "up"}:
                raise ConfigError(f"adapter experts of layer {layer} need both 'down' and 'up', found {sorted(rests)}")

    def read_expert_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter of a PESC model crafted with one expert, per crafted layer."""
        out = {}
        for i, mlp in crafted_layers(model):
            experts = getattr(mlp.moe, "experts", None)
            if not hasattr(experts, "down") or experts.num_experts != 1:
                raise ConfigError("adapter experts are read from a PESC model crafted with num_experts=1")
            out.update({f"layers.{i}.{rest}": v for rest, v in experts.expert_weights(0).items()})
        return out

    def expert_meta(self, model: nn.Module, config: CraftConfig) -> dict:
        return {"adapter_dim": config.adapter_dim, "scaling": config.scaling, "activation": config.activation}

    def derived_settings(self, experts) -> dict:
        per_layer = by_layer(experts.base)
        derived = {"adapter_dim": experts.base[per_layer[min(per_layer)]["down"]].shape[0]}
        for name in ("scaling", "activation"):  # the adapters were trained with these
            if name in experts.meta:
                derived[name] = experts.meta[name]
        return derived
