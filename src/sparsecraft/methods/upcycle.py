"""Sparse Upcycling (Komatsuzaki et al. 2022), the baseline PESC is compared with: each chosen dense FFN becomes
E full trainable copies of itself behind a top-k router (the block is `moe.upcycle.UpcycledMoE`).

The dense FFN's own keys disappear (the copies replace it), so a standalone save writes expert 0 under them to
keep `base/` a complete checkpoint. UpIT's `ffn` expert kind builds this MoE: one FFN per expert, keys
`layers.{i}.{param path inside the MLP}`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..errors import ConfigError
from ..moe.gated import gated_weights
from ..moe.layers import RouterSite
from ..moe.upcycle import UpcycledMLP, UpcycledMoE, add_noise, make_experts
from ..surgery import (
    crafted_layers,
    find_decoder_layers,
    find_ffn,
    install_blocks,
    is_crafted,
    plan_layers,
    text_config,
)
from .base import Method


class UpcycleMethod(Method):
    name = "upcycle"
    title = "Sparse Upcycling"
    expert_kind = "ffn"
    experts_full_precision = True
    experts_may_idle = True  # FFNs of unusual structure run as a loop over copies; an unchosen one idles
    shares_ffn = False  # the copies replace the FFN
    added_parts = ("routers", "experts")
    upit_dense_method = "upcycle"  # one always-chosen FFN copy: the FFN itself trains
    upit_defaults = {"common": {"quantization": "none"},
                     "prepare": {"lora": {"enabled": False}, "optim": {"lr": 2e-5}},
                     "upcycle": {"lora": {"enabled": False}, "optim": {"lr": 2e-5}}}
    upit_existing = "checkpoint"

    def craft(self, model: nn.Module, config: CraftConfig | None = None, *, seed: int | None = None,
              adapter_dtype: torch.dtype | None = None, noise_std: float = 0.0, **overrides) -> nn.Module:
        """Sparse-upcycle the chosen FFNs, in place.

        `config`: `num_experts`, `top_k`, routing, router dtype, loss coefficients, `layers` and `dispatch`
        (`sorted`/`loop` force the sliced loop) are used; the adapter fields are ignored. `seed` seeds the
        router initialisation and the noise; `noise_std` (absolute) breaks the symmetry between copies (0, the
        default as in Komatsuzaki et al., keeps exact copies: the model then computes what the dense one did).
        """
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or not 0 <= noise_std < math.inf:
            raise ConfigError(f"noise_std must be a non-negative number, got {noise_std!r}")
        plan = plan_layers(model, config, overrides, verb="upcycle")

        def build(index: int, ffn: nn.Module, site) -> UpcycledMoE:
            moe = UpcycledMoE(site, make_experts(ffn, plan.config.num_experts))
            if noise_std:
                add_noise(moe.experts, noise_std)
            return moe

        def attach(index: int, name: str, ffn: nn.Module, moe: UpcycledMoE) -> None:
            mlp = UpcycledMLP(moe).train(ffn.training)
            setattr(plan.layers[index], name, mlp)  # the dense FFN goes: its weights live on only in the copies

        return install_blocks(model, plan, self.name, seed, build, attach)

    def standalone_base_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**state, **dense_ffn_state(model)}

    def moe_bytes_per_token(self, shape, num_tokens: int) -> tuple[int, str]:
        router, _ = super().moe_bytes_per_token(shape, num_tokens)
        a, h, i, k = shape.act_bytes, shape.hidden, shape.intermediate, shape.top_k
        # per slot: gathered input h, gate_up 2i, act·up i, expert output h
        return router + a * k * (2 * h + 3 * i), "upcycle 4E+12k + 2k(2h+3i)"

    def expert_macs(self, hidden: int, ffn_macs: int, rank: int) -> int:
        return ffn_macs  # each expert is a whole FFN

    def standalone_block(self, ffn: nn.Module, hidden: int, config: CraftConfig, *, device=None, dtype=None):
        # stacked copies leave `ffn` alone; the copy-and-loop fallback would make `ffn` itself expert 0
        source = ffn if gated_weights(ffn) is not None else copy.deepcopy(ffn)
        moe = UpcycledMoE(RouterSite(hidden, config, device=device), make_experts(source, config.num_experts))
        for p in moe.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        return moe, moe

    def check_expert_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        return None  # any FFN state; checked against the model's FFNs when built

    def read_expert_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every layer's FFN weights of a dense (or one-expert upcycled) model."""
        out = {}
        upcycled = dict(crafted_layers(model)) if is_crafted(model) else {}
        _, layers = find_decoder_layers(model)
        hidden = text_config(model).hidden_size
        for i, layer in enumerate(layers):
            if i in upcycled:
                out.update({f"layers.{i}.{k}": v for k, v in upcycled[i].moe.experts.expert_weights(0).items()})
                continue
            _, ffn = find_ffn(layer, hidden)
            out.update({f"layers.{i}.{k}": v for k, v in ffn.state_dict().items()})
        return out

    def check_experts_fit(self, model: nn.Module, per_layer: dict[int, dict[str, str]], experts) -> None:
        _, layers = find_decoder_layers(model)
        hidden = text_config(model).hidden_size
        for layer, rests in per_layer.items():  # against each dense FFN, before changing anything
            if layer >= len(layers):
                raise ConfigError(f"expert layer {layer} is out of range for a model with {len(layers)} layers")
            _, ffn = find_ffn(layers[layer], hidden)
            own = {k: tuple(v.shape) for k, v in ffn.state_dict().items()}
            theirs = {rest: tuple(experts.base[key].shape) for rest, key in rests.items()}
            if own != theirs:
                raise ConfigError(f"FFN experts of layer {layer} do not match its FFN: expert keys/shapes {theirs}, "
                                  f"FFN {own}")


def upcycled_layers(model: nn.Module) -> list[tuple[int, UpcycledMLP]]:
    """`[(layer_index, upcycled_mlp), ...]` for every upcycled layer."""
    return [(i, mlp) for i, mlp in crafted_layers(model) if isinstance(mlp, UpcycledMLP)]


def dense_ffn_state(model: nn.Module, expert: int = 0) -> dict[str, torch.Tensor]:
    """Dense-FFN state-dict entries for every upcycled layer, taken from expert `expert` (copies, on the CPU).

    For writing the base of an upcycled model as a complete plain transformers checkpoint: its own FFN keys
    (`...mlp.gate_proj.weight`, ...) are gone from the model, and loading replaces them with the saved experts.
    """
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, UpcycledMLP):
            continue
        parts = module.moe.experts.expert_weights(expert)
        # clones: views of one stacked tensor would be treated as shared storage by checkpoint writers
        state.update({f"{name}.{k}": v.detach().to("cpu").clone() for k, v in parts.items()})
    return state
