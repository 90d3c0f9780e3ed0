"""The MoE parts of a model (routers and expert weights, by decoder layer) and freezing them apart.

Works on any model holding `RoutedBlock`s, whatever the method, peft-wrapped or NF4-quantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import ConfigError
from .layers import RoutedBlock


@dataclass
class MoEModules:
    """`routers[i]` (nn.Linear, weight `[E, h]`) and `experts[i]` (the block's expert-weights module) of every
    MoE layer, by decoder layer index."""

    routers: dict[int, nn.Linear]
    experts: dict[int, nn.Module]

    def router_parameters(self) -> list[nn.Parameter]:
        return [m.weight for _, m in sorted(self.routers.items())]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in sorted(self.experts.items()) for p in m.parameters() if p.is_floating_point()]


def expert_modules(model: nn.Module) -> MoEModules:
    """Routers and expert weights of every MoE layer; ConfigError when the model has none."""
    routers, experts = {}, {}
    for module in model.modules():
        if isinstance(module, RoutedBlock):
            routers[module.layer_index] = module.router
            experts[module.layer_index] = module.experts
    if not routers:
        raise ConfigError(f"{type(model).__name__} has no MoE layers")
    return MoEModules(routers, experts)


def set_trainable(model: nn.Module, *, routers: bool, experts: bool) -> int:
    """Set `requires_grad` of all routers and all expert weights (nothing else is touched).

    `routers=True, experts=False` is UpIT's router pre-training; both True its post-training. Returns the number
    of trainable MoE parameters (elements).
    """
    parts = expert_modules(model)
    for p in parts.router_parameters():
        p.requires_grad_(routers)
    for p in parts.expert_parameters():
        p.requires_grad_(experts)
    return sum(p.numel() for p in parts.router_parameters() + parts.expert_parameters() if p.requires_grad)
