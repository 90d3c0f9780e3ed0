"""UpIT's MoE (arXiv 2410.01610): built from an expert set and, optionally, pre-trained router rows.

`build_moe` is the one way an expert set becomes a model: the set's kind names the method (`registry`), the
set fixes the expert count, the layers and what the experts were trained with (rank, scaling), and the user's
other crafting settings apply. A setting the user wrote that the set contradicts is a one-line error, never
silently replaced. The recipe method `upit` is post-training such a model (`upit.experts`, `upit.router`);
the directory it saves records the kind's method (`pesc`, `upcycle`, `lora_experts`), since that is what it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..errors import ConfigError
from ..surgery import crafted_layers, text_config
from .base import Method
from .expert_set import ExpertSet, load_expert_set, load_router
from .registry import method_for_kind


def _load_shared(model: nn.Module, shared: dict[str, torch.Tensor]) -> None:
    """Copy `shared` into the model's own weights, refusing unknown keys and other shapes."""
    if not shared:
        return
    state = model.state_dict()
    for key, tensor in shared.items():
        if key not in state:
            raise ConfigError(f"shared weight {key!r} is not in {type(model).__name__}'s state dict")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"shared weight {key!r} has shape {tuple(tensor.shape)}, the model "
                              f"{tuple(state[key].shape)}")
    model.load_state_dict(shared, strict=False)


def set_routers(model: nn.Module, router: dict[int, torch.Tensor], num_experts: int, hidden: int) -> None:
    """Copy `{decoder layer index: [E, h]}` router rows into the MoE blocks (other layers keep their init)."""
    blocks = {i: mlp.moe for i, mlp in crafted_layers(model)}
    with torch.no_grad():
        for layer, weight in router.items():
            index = int(layer)
            if index not in blocks:
                raise ConfigError(f"router weights for layer {layer} but the MoE layers are {sorted(blocks)}")
            if tuple(weight.shape) != (num_experts, hidden):
                raise ConfigError(f"router weights for layer {layer} have shape {tuple(weight.shape)}, expected "
                                  f"{(num_experts, hidden)}")
            target = blocks[index].router.weight
            target.copy_(weight.to(device=target.device, dtype=target.dtype))


def settings_from_set(es: ExpertSet, craft: CraftConfig, explicit: Iterable[str] = ()) -> tuple[dict, dict]:
    """`(settings, derived)`: CraftConfig fields for building `es`, and those the set fixed.

    `explicit` names the fields the user wrote; one of those that differs from what the set fixes is a
    ConfigError naming both values (a default the user never wrote is simply replaced, and reported in
    `derived`)."""
    fixed = {"num_experts": es.num_experts, "layers": es.layers(),
             **method_for_kind(es.kind).derived_settings(es)}
    settings = craft.to_dict()
    explicit = set(explicit)
    derived = {}
    for name, value in fixed.items():
        if name == "extra":
            settings["extra"] = {**settings.get("extra", {}), **value}
            continue
        if name in explicit and settings[name] != value:
            raise ConfigError(f"craft.{name}={settings[name]!r} conflicts with the {es.kind} expert set, which "
                              f"fixes {name}={value!r}: remove the setting or make it {value!r}")
        if settings[name] != value:
            derived[name] = value
        settings[name] = value
    if craft.top_k > es.num_experts:
        raise ConfigError(f"top_k ({craft.top_k}) cannot exceed the number of experts ({es.num_experts})")
    return settings, derived


def build_moe(
    model: nn.Module,
    es: ExpertSet,
    craft: CraftConfig,
    router: dict[int, torch.Tensor] | None = None,
    *,
    seed: int | None = None,
    explicit: Iterable[str] = (),
) -> nn.Module:
    """Turn a dense causal LM (plain transformers, not peft-wrapped) into the MoE of `es`, in place.

    Args:
        model: the dense base the experts were trained on.
        es: the experts; their count becomes `num_experts`, the layers their keys cover `layers`, and what
            they were trained with (rank, scaling) the matching settings. `es.shared` is loaded first.
        craft: the other settings: `top_k`, routing, router dtype, loss coefficients, dropout, dispatch.
        router: optional `{decoder layer index: [E, h]}` initial router weights.
        seed: seeds the default router (and unused A) initialisation.
        explicit: crafting fields the user set; a conflict with the set is a ConfigError (`settings_from_set`).

    Returns the model; `crafted_layers(model)` lists the blocks; `sparsecraft.save` / `load` round-trip it.
    `settings_from_set` tells which settings the set fixed.
    """
    es.validate()
    settings, _ = settings_from_set(es, craft, explicit)
    _load_shared(model, es.shared)
    method_for_kind(es.kind).build_from_experts(model, es, CraftConfig.from_dict(settings), seed)
    if router:
        set_routers(model, router, es.num_experts, text_config(model).hidden_size)
    if es.shared:
        # the base weights now differ from the base on disk: a referenced save must carry these (crafted.py)
        model._sparsecraft_shared = dict(es.shared)
    return model


class UpitMethod(Method):
    """Recipe method `upit`: post-training the MoE of an UpIT expert set (options: the recipe's `upit:`)."""

    name = "upit"
    title = "UpIT"
    crafts_from_base = False  # built from an expert set (`upit.experts`)
    experts_full_precision = True  # FFN experts train; all kinds quantise the base after building
    experts_may_idle = True
    options_field = "upit"

    def validate_options(self, options: Any) -> None:
        if not getattr(options, "experts", ""):
            raise ConfigError("method upit needs upit.experts: an expert-set directory (from `sparsecraft upit`)")

    def build(self, model: nn.Module, config: CraftConfig, *, seed=None, adapter_dtype=None, options=None,
              explicit: Iterable[str] = ()) -> nn.Module:
        self.validate_options(options)
        experts = load_expert_set(options.experts)
        router = load_router(options.router) if options.router else None
        _, derived = settings_from_set(experts, config, explicit)
        build_moe(model, experts, config, router=router, seed=seed, explicit=explicit)
        if derived:
            fixed = ", ".join(f"{k}={v}" for k, v in derived.items())
            print(f"upit: the {experts.kind} expert set fixes {fixed}")
        return model
