"""Expert and shared weights read out of a live dense-stage model, under the canonical expert keys
(`methods/expert_keys.py`).

An expert is the FFN LoRA (kind lora), the FFN of a one-expert upcycled block (kind ffn) or the adapter (kind
adapter) the model holds now; LoRA elsewhere (attention) becomes deltas of the base weights, and the deltas of
several states are combined into `ExpertSet.shared` (`prepare.shared`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import CraftConfig
from ..errors import CheckpointError
from ..methods import method_for_kind
from ..methods.expert_set import expert_state
from ..surgery import find_decoder_layers, find_ffn, text_config


def ffn_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """`(layer index, qualified name, FFN module)` of every decoder layer of a (possibly peft-injected) model."""
    layers_name, layers = find_decoder_layers(model)
    hidden = text_config(model).hidden_size
    out = []
    for i, layer in enumerate(layers):
        name, ffn = find_ffn(layer, hidden)
        out.append((i, f"{layers_name}.{i}.{name}", ffn))
    return out


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached fp32 CPU copy."""
    return t.detach().to("cpu", torch.float32).clone()


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def shared_lora_deltas(model: nn.Module, skip_ffn: bool) -> dict[str, torch.Tensor]:
    """`{dense state-dict key: scaling * B @ A}` of LoRA outside the experts (attention; FFN when not experts)."""
    prefixes = tuple(qual + "." for _, qual, _ in ffn_modules(model)) if skip_ffn else ()
    return {f"{name}.weight": cpu_copy(module.get_delta_weight("default"))
            for name, module in _lora_layers(model) if not (prefixes and name.startswith(prefixes))}


def read_experts(model: nn.Module, kind: str, config: CraftConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """The canonical expert state of `kind` the live dense-stage model holds now, and its meta; `config`: the
    dense stage's crafting settings."""
    return expert_state(model, kind), method_for_kind(kind).expert_meta(model, config)


def combine_shared(deltas: list[dict[str, torch.Tensor]], mode: str, base_model: nn.Module | None) -> dict:
    """Shared weights `{base state-dict key: base weight + delta}`, the delta being the mean (`average`) or the
    last (`last`) of the experts' deltas; empty for `base`. Weights no expert changed are left out."""
    if mode == "base" or not deltas or not deltas[0]:
        return {}
    chosen = deltas if mode == "average" else deltas[-1:]
    weights = base_model.state_dict()
    shared = {}
    for key in deltas[0]:
        if key not in weights:
            raise CheckpointError(f"shared weight {key} is not a weight of the base model")
        mean = torch.stack([d[key] for d in chosen]).mean(0)
        if mean.any():
            shared[key] = (weights[key].detach().float().cpu() + mean.reshape(weights[key].shape)).contiguous()
    return shared
