"""The surgery kit every method uses: find a decoder's layers and FFNs by structure, plan which to change,
seed the new weights, and mark a model as crafted.

Nothing here knows model families or methods by name. The decoder layers are the `nn.ModuleList` holding
`num_hidden_layers` modules of one class; the FFN of a layer is its child that maps `hidden_size` to a wider
size and back with linear layers and is not attention. A crafted MLP is any module carrying a MoE block
(`moe.layers.RoutedBlock`) as its `moe` child, whatever the method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import DISPATCH_PATHS, CraftConfig, parse_layer_spec
from .errors import ConfigError, CraftError
from .moe.layers import RoutedBlock, RouterSite, RoutingRecorder, is_moe_mlp
from .moe.model import pesc_lm_class

FFN_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")
ATTENTION_HINTS = ("attn", "attention")
MOE_KEY = ".moe."  # every parameter a method adds lives under the MLP's `moe` child


def text_config(model_or_config):
    """The text decoder's config of a model or config (multimodal configs hold it as a sub-config)."""
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
    for name in FFN_NAMES:
        if name in children and (is_moe_mlp(children[name]) or _is_ffn(children[name], hidden)):
            return name, children[name]
    candidates = [
        (name, child)
        for name, child in children.items()
        if not any(h in name.lower() for h in ATTENTION_HINTS) and _is_ffn(child, hidden)
    ]
    if len(candidates) == 1:
        return candidates[0]
    for name, child in children.items():
        if not any(h in name.lower() for h in ATTENTION_HINTS) and looks_like_moe(child):
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


def looks_like_moe(module: nn.Module) -> bool:
    """A module holding stacked (3-D) expert weights or a list of sub-modules (experts), except an MLP that only
    carries a sparsecraft block."""
    if is_moe_mlp(module):
        return False
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) or any(p.dim() == 3 for p in sub.parameters(recurse=False)):
            return True
    return False


def module_dtype(model: nn.Module) -> torch.dtype:
    """The first floating parameter's dtype (fp32 for a module without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_crafted(model: nn.Module) -> bool:
    return hasattr(type(model), "_sparsecraft_base_class") and hasattr(model, "_sparsecraft_config")


def method_name_of(model: nn.Module) -> str | None:
    """The registered name of the method that crafted `model` (None when it is not crafted)."""
    if not is_crafted(model):
        return None
    return getattr(model, "_sparsecraft_method", "pesc")  # the attribute predates non-PESC methods


def craft_config_of(model: nn.Module) -> CraftConfig:
    if not is_crafted(model):
        raise CraftError("model is not crafted")
    return model._sparsecraft_config


def crafted_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """`[(layer_index, mlp), ...]` for every crafted layer of a crafted model, whatever the method (the MoE
    block is `mlp.moe`)."""
    _, layers = find_decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        # look only for MoE children: layers left alone need not have a recognisable dense FFN
        found = [child for child in layer.children() if is_moe_mlp(child)]
        if found:
            out.append((i, found[0]))
    return out


def is_added_name(name: str) -> bool:
    """Whether a parameter name belongs to what crafting added (router, experts: under a `moe` child)."""
    return MOE_KEY in f".{name}"


def new_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router and expert parameters added by crafting, by state-dict name, and the blocks' saved buffers (the
    selection biases of loss-free balancing): what a crafted checkpoint stores."""
    return {**{n: p for n, p in model.named_parameters() if is_added_name(n)},
            **{n: b for n, b in model.named_buffers() if is_added_name(n)}}


@dataclass
class LayerPlan:
    """What crafting will change, worked out before anything is changed."""

    config: CraftConfig
    hidden: int
    chosen: list[int]
    layers: nn.ModuleList  # the decoder layers
    targets: list[tuple[int, str, nn.Module]]  # (layer index, FFN child name, FFN module)
    model_dtype: torch.dtype
    router_dtype: torch.dtype

    def site(self, index: int, ffn: nn.Module) -> RouterSite:
        """The `RouterSite` of the block for layer `index`, on its FFN's device."""
        return RouterSite(self.hidden, self.config, index, device_of(ffn), self.router_dtype)


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
        if is_moe_mlp(ffn):
            raise CraftError(f"'{layers_name}.{index}.{name}' already has experts; load the dense base")
        if looks_like_moe(ffn):
            raise CraftError(
                f"cannot craft: '{layers_name}.{index}.{name}' ({type(ffn).__name__}) is already a mixture of "
                "experts; PESC expects a dense FFN"
            )
        targets.append((index, name, ffn))
    model_dtype = module_dtype(model)
    router_dtype = torch.float32 if config.router_dtype == "float32" else model_dtype
    return LayerPlan(config, hidden, chosen, layers, targets, model_dtype, router_dtype)


def device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed the new weights' initialisation; fork_rng restores the global CPU (and CUDA) generators afterwards,
    so a seed does not leak out."""
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def install_blocks(
    model: nn.Module,
    plan: LayerPlan,
    method: str,
    seed: int | None,
    build: Callable[[int, nn.Module, RouterSite], RoutedBlock],
    attach: Callable[[int, str, nn.Module, RoutedBlock], None],
) -> nn.Module:
    """The crafting loop every method shares: under `seed`, `build(index, ffn, site)` makes each planned layer's
    block, which joins the model's routing recorder and follows the FFN's train/eval mode, and `attach(index,
    name, ffn, block)` puts it in place; then the model is marked as crafted by `method`."""
    recorder = RoutingRecorder()
    with seeded(seed):
        for index, name, ffn in plan.targets:
            block = build(index, ffn, plan.site(index, ffn))
            block.recorder = recorder
            block.train(ffn.training)  # new modules start in train mode; follow the model (dropout off in eval)
            attach(index, name, ffn, block)
    return mark_crafted(model, plan, recorder, method)


def mark_crafted(model: nn.Module, plan: LayerPlan, recorder: RoutingRecorder, method: str) -> nn.Module:
    """Record the settings and the method's registered name on the model and switch it to the class whose
    forward adds the router losses."""
    model._sparsecraft_config = plan.config
    model._sparsecraft_recorder = recorder
    model._sparsecraft_layers = plan.chosen
    model._sparsecraft_method = method
    model.__class__ = pesc_lm_class(type(model))
    return model


def unmark_crafted(model: nn.Module) -> nn.Module:
    """Undo `mark_crafted` (the blocks must have been detached already)."""
    model.__class__ = type(model)._sparsecraft_base_class
    for attr in ("_sparsecraft_config", "_sparsecraft_recorder", "_sparsecraft_layers", "_sparsecraft_method"):
        delattr(model, attr)
    return model


def set_dispatch(model: nn.Module, path: str) -> None:
    """Set the dispatch path (`auto`, `rule`, or one of `config.DISPATCH_PATHS`' named paths) of every crafted
    layer (the blocks share the model's config object)."""
    cfg = craft_config_of(model)
    if path not in DISPATCH_PATHS:
        raise ConfigError(f"dispatch must be one of {', '.join(DISPATCH_PATHS)}; got {path!r}")
    cfg.dispatch = path
