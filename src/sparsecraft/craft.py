"""Model surgery: find a decoder's layers and FFNs by structure and turn chosen FFNs into PESC MoE blocks.

Nothing here knows model families by name. The decoder layers are the `nn.ModuleList` holding
`num_hidden_layers` modules of one class; the FFN of a layer is its child that maps `hidden_size` to a wider
size and back with linear layers and is not attention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import DISPATCH_PATHS, ConfigError, CraftConfig, parse_layer_spec
from .errors import CraftError
from .moe.layers import PescMoE, RoutingRecorder, attach_pesc, detach_pesc, is_pesc_mlp
from .moe.lora_experts import is_lora_experts_mlp
from .moe.model import pesc_lm_class
from .moe.upcycle import is_upcycled_mlp

_FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
_ATTENTION_HINTS = ("attn", "attention")


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return `(dotted_name, layers)` of the decoder's layer list.

    Raises `CraftError` naming what was looked for when there is no `nn.ModuleList` of `num_hidden_layers`
    same-class modules.
    """
    num_layers = getattr(text_config(model), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if len({type(m) for m in module}) == 1 and any(True for _ in module[0].children()):
            return name, module
    raise CraftError(
        f"cannot craft {type(model).__name__}: expected an nn.ModuleList of {num_layers} decoder layers "
        "(config.num_hidden_layers) of one class, found none"
    )


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Linear) or type(m).__name__.startswith("Linear")]


def _is_ffn(module: nn.Module, hidden: int) -> bool:
    linears = _linears(module)
    if len(linears) < 2:
        return False
    takes_hidden = any(getattr(m, "in_features", None) == hidden for m in linears)
    gives_hidden = any(getattr(m, "out_features", None) == hidden for m in linears)
    widens = any(getattr(m, "out_features", 0) > hidden for m in linears)
    return takes_hidden and gives_hidden and widens


def find_ffn(layer: nn.Module, hidden: int) -> tuple[str, nn.Module]:
    """Return `(child_name, ffn_module)` for one decoder layer; raise `CraftError` if none or ambiguous."""
    children = dict(layer.named_children())
    for name in _FFN_NAMES:
        if name in children and (is_pesc_mlp(children[name]) or _is_ffn(children[name], hidden)):
            return name, children[name]
    candidates = [
        (name, child)
        for name, child in children.items()
        if not any(h in name.lower() for h in _ATTENTION_HINTS) and _is_ffn(child, hidden)
    ]
    if len(candidates) == 1:
        return candidates[0]
    for name, child in children.items():
        if not any(h in name.lower() for h in _ATTENTION_HINTS) and _looks_like_moe(child):
            raise CraftError(
                f"cannot craft {type(layer).__name__}: its '{name}' ({type(child).__name__}) is already a mixture "
                f"of experts; PESC expects a dense feed-forward child (linear layers mapping hidden_size={hidden} "
                "to a wider size and back)"
            )
    found = ", ".join(f"{n} ({type(c).__name__})" for n, c in children.items())
    problem = "found several" if candidates else "found none"
    raise CraftError(
        f"cannot craft {type(layer).__name__}: expected one feed-forward child (linear layers mapping "
        f"hidden_size={hidden} to a wider size and back, usually named 'mlp'); {problem} among: {found}"
    )


def _looks_like_moe(module: nn.Module) -> bool:
    """A module holding stacked (3-D) expert weights or a list of sub-modules (experts), PESC blocks excepted."""
    if is_pesc_mlp(module):
        return False
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) or any(p.dim() == 3 for p in sub.parameters(recurse=False)):
            return True
    return False


def _check_not_moe(name: str, ffn: nn.Module) -> None:
    if _looks_like_moe(ffn):
        raise CraftError(
            f"cannot craft: '{name}' ({type(ffn).__name__}) is already a mixture of experts; PESC expects a "
            "dense FFN"
        )


def _module_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _resolve_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name == "float32" else model_dtype


def is_crafted(model: nn.Module) -> bool:
    return hasattr(type(model), "_sparsecraft_base_class") and hasattr(model, "_sparsecraft_config")


def crafted_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """`[(layer_index, mlp), ...]` for every crafted layer of a crafted model (PESC, upcycled or LoRA-expert MLP;
    the MoE block is `mlp.moe`)."""
    _, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        # look only for PESC children: layers left alone need not have a recognisable dense FFN
        pesc = [child for child in layer.children()
                if is_pesc_mlp(child) or is_upcycled_mlp(child) or is_lora_experts_mlp(child)]
        if pesc:
            out.append((i, pesc[0]))
    return out


@dataclass
class LayerPlan:
    """What crafting (or upcycling) will change, worked out before anything is changed."""

    config: CraftConfig
    hidden: int
    chosen: list[int]
    layers: nn.ModuleList  # the decoder layers
    targets: list[tuple[int, str, nn.Module]]  # (layer index, FFN child name, FFN module)
    model_dtype: torch.dtype
    router_dtype: torch.dtype


def plan_layers(model: nn.Module, config: CraftConfig | None, overrides: dict, verb: str = "craft") -> LayerPlan:
    """Resolve the settings (a private copy) and check every chosen layer, raising before any change."""
    base = config.to_dict() if config is not None else {}
    config = CraftConfig.from_dict({**base, **overrides})  # a private copy: later changes stay with this model
    if is_crafted(model):
        raise CraftError(f"model is already crafted; load the dense base to {verb} it")
    hidden = getattr(text_config(model), "hidden_size", None)
    if hidden is None:
        raise CraftError(f"cannot {verb} {type(model).__name__}: its config has no hidden_size")
    layers_name, layers = find_decoder_layers(model)
    chosen = parse_layer_spec(config.layers, len(layers))
    targets = []
    for index in chosen:
        name, ffn = find_ffn(layers[index], hidden)
        if is_pesc_mlp(ffn):
            raise CraftError(f"'{layers_name}.{index}.{name}' already has PESC experts; load the dense base")
        _check_not_moe(f"{layers_name}.{index}.{name}", ffn)
        targets.append((index, name, ffn))
    model_dtype = _module_dtype(model)
    router_dtype = _resolve_dtype(config.router_dtype, model_dtype)
    return LayerPlan(config, hidden, chosen, layers, targets, model_dtype, router_dtype)


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed the new weights' initialisation; fork_rng restores the global CPU (and CUDA) generators afterwards,
    so a seed does not leak out."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def mark_crafted(model: nn.Module, plan: LayerPlan, recorder: RoutingRecorder, method: str) -> nn.Module:
    """Record the settings on the model and switch it to the class whose forward adds the router losses."""
    model._sparsecraft_config = plan.config
    model._sparsecraft_recorder = recorder
    model._sparsecraft_layers = plan.chosen
    model._sparsecraft_method = method
    model.__class__ = pesc_lm_class(type(model))
    return model


def craft(
    model: nn.Module,
    config: CraftConfig | None = None,
    *,
    seed: int | None = None,
    adapter_dtype: torch.dtype | None = None,
    **overrides,
) -> nn.Module:
    """Turn the chosen FFNs of a transformers causal LM into PESC MoE blocks, in place.

    Args:
        model: a transformers causal LM (any decoder family with a dense FFN per layer).
        config: crafting settings; keyword `overrides` replace individual fields.
        seed: seeds the new weights' initialisation (router and `W_down`); `W_up` is zero regardless.
        adapter_dtype: dtype of router-free adapter weights; default the model's floating dtype.

    Returns:
        The same model object, now of a `Pesc*` subclass of its class, whose forward also returns the router
        losses. The crafted model computes exactly what the dense one did until `W_up` changes.
    """
    plan = plan_layers(model, config, overrides)
    recorder = RoutingRecorder()
    with seeded(seed):
        for index, _, ffn in plan.targets:
            device = next((p.device for p in ffn.parameters()), None)
            moe = PescMoE(plan.hidden, plan.config, index, device=device, dtype=adapter_dtype or plan.model_dtype,
                          router_dtype=plan.router_dtype)
            moe.recorder = recorder
            moe.train(ffn.training)  # new modules start in train mode; follow the model (dropout off in eval)
            attach_pesc(ffn, moe)
    return mark_crafted(model, plan, recorder, "pesc")


def uncraft(model: nn.Module) -> nn.Module:
    """Remove every PESC block and return the dense model (in place)."""
    if not is_crafted(model):
        raise CraftError("model is not crafted")
    if getattr(model, "_sparsecraft_method", "pesc") == "upcycle":
        raise CraftError("an upcycled model has no dense FFN to restore; load the dense base instead")
    for _, ffn in crafted_layers(model):
        detach_pesc(ffn)
    model.__class__ = type(model)._sparsecraft_base_class
    for attr in ("_sparsecraft_config", "_sparsecraft_recorder", "_sparsecraft_layers", "_sparsecraft_method"):
        delattr(model, attr)
    return model


def craft_config_of(model: nn.Module) -> CraftConfig:
    if not is_crafted(model):
        raise CraftError("model is not crafted")
    return model._sparsecraft_config


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Router and adapter parameters added by crafting, by state-dict name."""
    return {n: p for n, p in model.named_parameters() if ".moe." in f".{n}"}


def set_pesc_dispatch(model: nn.Module, path: str) -> None:
    """Force one dispatch path (`auto`, `dense`, `grouped`, `sorted`, `loop`) on every crafted layer."""
    cfg = craft_config_of(model)
    if path not in DISPATCH_PATHS:
        raise ConfigError(f"dispatch must be one of {', '.join(DISPATCH_PATHS)}; got {path!r}")
    cfg.dispatch = path
