"""MixLoRA (MoE-PEFT, Li et al. 2024): LoRA experts on every projection of each chosen FFN, a top-k router on the
FFN input and the load-balancing loss; attention LoRA, when the recipe asks for it, stays a shared dense LoRA.

The layer is the LoRA-expert block UpIT uses (`methods/lora_experts.py`); what MixLoRA adds is crafting it from
scratch: when `extra.lora_targets` is not given, every projection of the gated MLP gets experts
(`gate_proj`, `up_proj`, `down_proj`, or `gate_up_proj`, `down_proj` for a fused MLP). `adapter_dim` is the
LoRA rank r and `scaling` is alpha/r.
"""

from __future__ import annotations

import torch.nn as nn

from ..config import CraftConfig
from ..moe.gated import GatedLayout
from .lora_experts import TARGETS_KEY, LoraExpertsMethod


class MixLoraMethod(LoraExpertsMethod):
    name = "mixlora"
    title = "MixLoRA"
    expert_kind = None  # UpIT's lora kind builds `lora_experts`; this one crafts fresh experts
    crafts_from_base = True

    def targets_for(self, config: CraftConfig, layouts: list[tuple[int, nn.Module, GatedLayout]]) -> list[str]:
        if config.extra.get(TARGETS_KEY):
            return super().targets_for(config, layouts)
        return list(layouts[0][2].projections)
