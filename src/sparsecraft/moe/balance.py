"""Auxiliary-loss-free load balancing (DeepSeek-V3): each MoE block may carry a per-expert bias that is added to
the router scores when the top-k experts are chosen (never to the gates), and that is nudged after every optimizer
step towards even load: `bias_i += u * sign(mean_load - load_i)`. It is not trained by gradients."""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import RoutedBlock

BIAS_NAME = "router_bias"  # the parameter's name inside a block (saved with the model, never in an optimizer)


def is_balance_bias(name: str) -> bool:
    """Whether a parameter name is a block's selection bias (kept out of the trainable set)."""
    return name == BIAS_NAME or name.endswith("." + BIAS_NAME)


def selection_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every block's selection bias, by state-dict name: `[E]` tensors a step changes by rule (checkpointed
    beside the optimizer's state)."""
    return {name: b for name, b in model.named_buffers() if is_balance_bias(name)}


@torch.no_grad()
def update_router_biases(model: nn.Module, counts: torch.Tensor, rate: float) -> int:
    """Apply one step's update to every block that has a selection bias.

    `counts`: `[L, E]` (token, slot) assignments per expert of the step, one row per MoE block in layer order
    (all data-parallel ranks summed, so every rank updates alike). Returns how many blocks were updated."""
    blocks = sorted((m for m in model.modules() if isinstance(m, RoutedBlock)), key=lambda b: b.layer_index)
    updated = 0
    for block, load in zip(blocks, counts):
        bias = getattr(block, BIAS_NAME, None)
        if bias is None:
            continue
        load = load.to(device=bias.device, dtype=torch.float32)
        bias.add_(rate * torch.sign(load.mean() - load))
        updated += 1
    return updated
