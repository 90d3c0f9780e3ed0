"""The dense baseline (the paper's "Camel"): no router and no experts, only LoRA (and NF4) on the base.

A directory saved from it holds the base reference and `lora/`; it loads as the base with the LoRA merged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import CraftConfig
from .base import Method


class DenseMethod(Method):
    name = "dense"
    title = "dense"
    builds_moe = False

    def build(self, model: nn.Module, config: CraftConfig, *, seed=None, adapter_dtype=None, options=None,
              explicit=()):
        return model  # nothing to add: training puts LoRA on it

    def new_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {}

    def moe_bytes_per_token(self, shape, num_tokens: int) -> tuple[int, str]:
        return 0, "no MoE"

    def restore(self, model: nn.Module, config: CraftConfig, layers: list[int]) -> nn.Module:
        return model

    def standalone_base_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state
