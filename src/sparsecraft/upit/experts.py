"""UpIT experts: one state per expert, saved as files, and stacked into a sparsecraft MoE.

An `ExpertSet` holds E expert states of one kind under canonical keys (`i` = decoder layer index as in
`craft.find_decoder_layers`, `proj` = the projection's attribute name inside the MLP):

- `lora`: `layers.{i}.{proj}.lora_A [r, in]`, `layers.{i}.{proj}.lora_B [out, r]`; delta W = s * B @ A with
  s = `meta["scaling"]` (else `meta["alpha"] / r`). `base` = the initial LoRA state (A as initialised, B = 0).
  Built as LoRA experts on the shared MLP (`moe.lora_experts`, the MixLoRA form).
- `ffn`: `layers.{i}.{param path inside the MLP}` (e.g. `layers.{i}.gate_proj.weight`); `base` = the dense FFN.
  Built by `moe.upcycle.upcycle` with each expert's weights written into its copy.
- `adapter`: `layers.{i}.down [r, h]`, `layers.{i}.up [h, r]` (one PESC adapter per layer); `base` = the
  initial adapter state (up = 0). Built by `craft` with each state in expert e's slice; `meta["scaling"]` and
  `meta["activation"]`, when present, override the craft settings (the adapters were trained with them).

`shared` holds full tensors under the model's own state-dict keys (e.g. `model.layers.0.self_attn.q_proj.weight`),
loaded into the model before the MoE is built; `sparsecraft.save` keeps them (see `checkpoint/crafted.py`).

On disk (`save_expert_set`): `experts.json` (kind, names, meta, keys) + `expert_{j}.safetensors`,
`base.safetensors`, `shared.safetensors`, written atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint.atomic import atomic_directory
from ..config import CraftConfig
from ..craft import crafted_layers, find_decoder_layers, find_ffn, text_config
from ..errors import CheckpointError, ConfigError
from ..moe.layers import RoutedBlock

EXPERT_KINDS = ("lora", "ffn", "adapter")
INDEX_NAME = "experts.json"
BASE_NAME = "base.safetensors"
SHARED_NAME = "shared.safetensors"
FORMAT_VERSION = 1
_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def _expert_file(j: int) -> str:
    return f"expert_{j}.safetensors"


@dataclass
class ExpertSet:
    """E expert states of one kind (see the module docstring for keys, `base` and `shared`).

    Attributes:
        kind: `lora`, `ffn` or `adapter`.
        states: one dict per expert, all with the same keys and shapes.
        base: the reference point of the deltas, same keys as the states.
        shared: non-expert weights under the model's state-dict keys; may be empty.
        meta: JSON-able facts (lora `r`/`alpha`/`scaling`/`targets`, adapter `scaling`, sources, lineage, ...).
        names: one label per expert.
    """

    kind: str
    states: list[dict[str, torch.Tensor]]
    base: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.states)

    def layers(self) -> list[int]:
        """Decoder layer indices the expert keys cover, sorted."""
        return sorted({int(_KEY.match(k).group(1)) for k in self.base})

    def validate(self) -> None:
        """ConfigError (one line) for the first inconsistency: kind, counts, keys, shapes, key syntax."""
        if self.kind not in EXPERT_KINDS:
            raise ConfigError(f"expert kind must be one of {', '.join(EXPERT_KINDS)}; got {self.kind!r}")
        if not self.states:
            raise ConfigError("an expert set needs at least one expert state")
        if len(self.names) != len(self.states):
            raise ConfigError(f"expert set has {len(self.states)} states but {len(self.names)} names")
        if not self.base:
            raise ConfigError("expert set has an empty base state")
        bad = next((k for k in self.base if not _KEY.match(k)), None)
        if bad is not None:
            raise ConfigError(f"expert key {bad!r} does not start with 'layers.{{i}}.'")
        shapes = {k: tuple(v.shape) for k, v in self.base.items()}
        for j, state in enumerate(self.states):
            if set(state) != set(shapes):
                diff = sorted(set(state) ^ set(shapes))
                raise ConfigError(f"expert {j} ({self.names[j]}) has other keys than the base, e.g. {diff[0]!r}")
            for k, v in state.items():
                if tuple(v.shape) != shapes[k]:
                    raise ConfigError(f"expert {j} ({self.names[j]}): {k} has shape {tuple(v.shape)}, base "
                                      f"{shapes[k]}")
        if self.kind == "lora":
            bad = next((k for k in shapes if not k.endswith((".lora_A", ".lora_B"))), None)
            if bad is not None:
                raise ConfigError(f"LoRA expert key {bad!r} must end in .lora_A or .lora_B")
            _lora_rank(self)
        elif self.kind == "adapter":
            bad = next((k for k in shapes if _KEY.match(k).group(2) not in ("down", "up")), None)
            if bad is not None:
                raise ConfigError(f"adapter expert key {bad!r} must be layers.{{i}}.down or layers.{{i}}.up")


# ------------------------------------------------------------------------------------------------ files


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clones: views of one storage (tied or stacked weights) are refused by safetensors
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}


def save_expert_set(es: ExpertSet, directory: str | os.PathLike) -> Path:
    """Write `es` to `directory` atomically (a temp sibling renamed into place). Returns the directory."""
    es.validate()
    directory = Path(directory)
    index = {
        "format": FORMAT_VERSION,
        "kind": es.kind,
        "num_experts": es.num_experts,
        "names": list(es.names),
        "meta": es.meta,
        "keys": sorted(es.base),
        "experts": [_expert_file(j) for j in range(es.num_experts)],
        "base": BASE_NAME,
        "shared": SHARED_NAME,
    }
    try:
        meta_text = json.dumps(index, indent=2)
    except TypeError as exc:
        raise ConfigError(f"expert set meta is not JSON-able: {exc}") from exc
    with atomic_directory(directory) as tmp:
        for j, state in enumerate(es.states):
            save_file(_cpu(state), str(tmp / _expert_file(j)), metadata={"name": es.names[j]})
        save_file(_cpu(es.base), str(tmp / BASE_NAME))
        save_file(_cpu(es.shared), str(tmp / SHARED_NAME))
        (tmp / INDEX_NAME).write_text(meta_text + "\n")
    return directory


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"expert set file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is corrupted or truncated: {exc}") from exc


def load_expert_set(directory: str | os.PathLike) -> ExpertSet:
    """Read an expert set written by `save_expert_set`; CheckpointError when missing or corrupt."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(f"{directory} is not an expert set: no {INDEX_NAME}")
    try:
        index = json.loads(index_path.read_text())
        kind, names, files = index["kind"], index["names"], index["experts"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid expert set index: {exc!r}") from exc
    if index.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{index_path} has format {index.get('format')!r}; this sparsecraft reads "
                              f"{FORMAT_VERSION}")
    es = ExpertSet(
        kind=kind,
        states=[_read(directory / name) for name in files],
        base=_read(directory / index.get("base", BASE_NAME)),
        shared=_read(directory / index.get("shared", SHARED_NAME)),
        meta=index.get("meta") or {},
        names=list(names),
    )
    try:
        es.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    if sorted(es.base) != index.get("keys", sorted(es.base)):
        raise CheckpointError(f"{directory}: the tensors do not match the keys listed in {INDEX_NAME}")
    return es


# ------------------------------------------------------------------------------------------------ build


def _by_layer(keys) -> dict[int, dict[str, str]]:
    """`{layer: {rest: full key}}` for canonical keys `layers.{i}.{rest}`."""
    out: dict[int, dict[str, str]] = {}
    for key in keys:
        m = _KEY.match(key)
        out.setdefault(int(m.group(1)), {})[m.group(2)] = key
    return out


def _lora_rank(es: ExpertSet) -> int:
    ranks = {v.shape[0] for k, v in es.base.items() if k.endswith(".lora_A")}
    ranks |= {v.shape[1] for k, v in es.base.items() if k.endswith(".lora_B")}
    if len(ranks) != 1:
        raise ConfigError(f"LoRA experts must share one rank; found ranks {sorted(ranks)}")
    return ranks.pop()


def _lora_scaling(es: ExpertSet, rank: int) -> float:
    if "scaling" in es.meta:
        return float(es.meta["scaling"])
    if "alpha" in es.meta:
        return float(es.meta["alpha"]) / rank
    raise ConfigError("LoRA expert set meta needs 'scaling' or 'alpha' (delta W = scaling * B @ A)")


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


def _blocks(model: nn.Module) -> dict[int, RoutedBlock]:
    return {i: mlp.moe for i, mlp in crafted_layers(model)}


def _set_routers(model: nn.Module, router: dict, num_experts: int, hidden: int) -> None:
    blocks = _blocks(model)
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


def _build_lora(model, es: ExpertSet, cfg: dict, seed) -> None:
    from ..moe.lora_experts import TARGETS_KEY, attach_lora_experts

    rank = _lora_rank(es)
    per_layer = _by_layer(es.base)
    targets = sorted({rest.rsplit(".", 1)[0] for rest in next(iter(per_layer.values()))})
    for layer, rests in per_layer.items():
        want = {f"{t}.{ab}" for t in targets for ab in ("lora_A", "lora_B")}
        if set(rests) != want:
            raise ConfigError(f"LoRA experts must cover the same projections (A and B) in every layer; layer "
                              f"{layer} has {sorted(rests)}")
    cfg.update(adapter_dim=rank, scaling=_lora_scaling(es, rank),
               extra={**cfg.get("extra", {}), TARGETS_KEY: targets})
    attach_lora_experts(model, CraftConfig.from_dict(cfg), seed=seed)
    with torch.no_grad():
        for layer, moe in _blocks(model).items():
            for proj in targets:
                for ab, stacked in (("lora_A", moe.experts.A), ("lora_B", moe.experts.B)):
                    param = stacked[proj]
                    key = f"layers.{layer}.{proj}.{ab}"
                    for e, state in enumerate(es.states):
                        param[e].copy_(state[key].to(device=param.device, dtype=param.dtype))


def _build_ffn(model, es: ExpertSet, cfg: dict, seed) -> None:
    from ..moe.upcycle import CopiedExperts, upcycle

    per_layer = _by_layer(es.base)
    _, layers = find_decoder_layers(model)
    hidden = text_config(model).hidden_size
    for layer, rests in per_layer.items():  # check against each dense FFN before changing anything
        if layer >= len(layers):
            raise ConfigError(f"expert layer {layer} is out of range for a model with {len(layers)} layers")
        _, ffn = find_ffn(layers[layer], hidden)
        own = {k: tuple(v.shape) for k, v in ffn.state_dict().items()}
        theirs = {rest: tuple(es.base[key].shape) for rest, key in rests.items()}
        if own != theirs:
            raise ConfigError(f"FFN experts of layer {layer} do not match its FFN: expert keys/shapes {theirs}, "
                              f"FFN {own}")
    upcycle(model, CraftConfig.from_dict(cfg), seed=seed)
    with torch.no_grad():
        for layer, moe in _blocks(model).items():
            experts, rests = moe.experts, per_layer[layer]
            for e, state in enumerate(es.states):
                weights = {rest: state[key] for rest, key in rests.items()}
                if isinstance(experts, CopiedExperts):
                    experts[e].load_state_dict(weights)
                    continue
                if experts.fused:
                    gate_up = weights["gate_up_proj.weight"]
                else:
                    gate_up = torch.cat([weights["gate_proj.weight"], weights["up_proj.weight"]], 0)
                experts.gate_up_proj[e].copy_(gate_up.to(experts.gate_up_proj.dtype))
                experts.down_proj[e].copy_(weights["down_proj.weight"].to(experts.down_proj.dtype))


def _build_adapter(model, es: ExpertSet, cfg: dict, seed) -> None:
    from ..craft import craft

    per_layer = _by_layer(es.base)
    for layer, rests in per_layer.items():
        if set(rests) != {"down", "up"}:
            raise ConfigError(f"adapter experts of layer {layer} need both 'down' and 'up', found {sorted(rests)}")
    rank = es.base[per_layer[min(per_layer)]["down"]].shape[0]
    cfg["adapter_dim"] = rank
    for name in ("scaling", "activation"):  # the adapters were trained with these
        if name in es.meta:
            cfg[name] = es.meta[name]
    craft(model, CraftConfig.from_dict(cfg), seed=seed, adapter_dtype=torch.float32)
    with torch.no_grad():
        for layer, moe in _blocks(model).items():
            for e, state in enumerate(es.states):
                for part in ("down", "up"):
                    param = getattr(moe.experts, part)
                    param[e].copy_(state[per_layer[layer][part]].to(param.dtype))


_BUILDERS = {"lora": _build_lora, "ffn": _build_ffn, "adapter": _build_adapter}


def build_moe(
    model: nn.Module,
    es: ExpertSet,
    craft: CraftConfig,
    router: dict[int, torch.Tensor] | None = None,
    *,
    seed: int | None = None,
) -> nn.Module:
    """Turn a dense causal LM (plain transformers, not peft-wrapped) into a sparsecraft MoE of `es`, in place.

    Args:
        model: the dense base the experts were trained on.
        es: the experts; `len(es.states)` becomes `num_experts`, the layers its keys cover become `layers`, and
            the rank (and LoRA / adapter scaling) come from it too. `es.shared` is loaded into the model first.
        craft: the other settings: `top_k`, routing, router dtype, loss coefficients, dropout, dispatch.
        router: optional `{decoder layer index: [E, h]}` initial router weights; other layers keep the default
            (seeded) init.
        seed: seeds the default router (and unused A) initialisation.

    Returns the same model object: `crafted_layers()` lists its blocks (`RoutedBlock`s with `.router [E, h]`),
    its forward adds the router losses, `sparsecraft.save` / `load` round-trip it. Method in saved configs:
    `lora_experts` (kind lora), `upcycle` (ffn), `pesc` (adapter).
    """
    es.validate()
    cfg = craft.to_dict()
    cfg.update(num_experts=es.num_experts, layers=es.layers())
    if craft.top_k > es.num_experts:
        raise ConfigError(f"top_k ({craft.top_k}) cannot exceed the number of experts ({es.num_experts})")
    _load_shared(model, es.shared)
    _BUILDERS[es.kind](model, es, cfg, seed)
    if router:
        _set_routers(model, router, es.num_experts, text_config(model).hidden_size)
    if es.shared:
        # the base weights now differ from the base on disk: a referenced save must carry these (crafted.py)
        model._sparsecraft_shared = dict(es.shared)
    return model


# ------------------------------------------------------------------------------------ freezing experts


@dataclass
class MoEModules:
    """The MoE parts of a model, by decoder layer index: `routers[i]` (nn.Linear, weight `[E, h]`) and
    `experts[i]` (the expert weights module: `LoraExpertWeights`, `GatedExperts`/`CopiedExperts` or
    `AdapterExperts`)."""

    routers: dict[int, nn.Linear]
    experts: dict[int, nn.Module]

    def router_parameters(self) -> list[nn.Parameter]:
        return [m.weight for _, m in sorted(self.routers.items())]

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in sorted(self.experts.items()) for p in m.parameters() if p.is_floating_point()]


def expert_modules(model: nn.Module) -> MoEModules:
    """Routers and expert weights of every MoE layer; works on peft-wrapped and NF4-quantised models too."""
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

    `set_trainable(model, routers=True, experts=False)` is router pre-training (UpIT stage 3); both True the
    post-training. Returns the number of trainable MoE parameters (elements).
    """
    parts = expert_modules(model)
    for p in parts.router_parameters():
        p.requires_grad_(routers)
    for p in parts.expert_parameters():
        p.requires_grad_(experts)
    return sum(p.numel() for p in parts.router_parameters() + parts.expert_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------ reading states


def expert_state(model: nn.Module, kind: str, *, adapter: str = "default") -> dict[str, torch.Tensor]:
    """One expert state (CPU copies, canonical keys) read from a dense-stage model.

    - `lora`: a (peft) LoRA-wrapped dense model: every MLP projection with a LoRA named `adapter`.
    - `ffn`: a dense model: every layer's FFN weights.
    - `adapter`: a PESC model crafted with one expert: its adapter per crafted layer.
    """
    if kind not in EXPERT_KINDS:
        raise ConfigError(f"expert kind must be one of {', '.join(EXPERT_KINDS)}; got {kind!r}")
    out: dict[str, torch.Tensor] = {}
    if kind == "adapter":
        for i, mlp in crafted_layers(model):
            experts = getattr(mlp.moe, "experts", None)
            if not hasattr(experts, "down") or experts.down.shape[0] != 1:
                raise ConfigError("adapter experts are read from a PESC model crafted with num_experts=1")
            out[f"layers.{i}.down"], out[f"layers.{i}.up"] = experts.down[0], experts.up[0]
    else:
        _, layers = find_decoder_layers(model)
        hidden = text_config(model).hidden_size
        for i, layer in enumerate(layers):
            _, ffn = find_ffn(layer, hidden)
            if kind == "ffn":
                out.update({f"layers.{i}.{k}": v for k, v in ffn.state_dict().items()})
                continue
            for name, module in ffn.named_children():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, nn.ModuleDict) and adapter in lora_a:
                    out[f"layers.{i}.{name}.lora_A"] = lora_a[adapter].weight
                    out[f"layers.{i}.{name}.lora_B"] = module.lora_B[adapter].weight
    if not out:
        raise ConfigError(f"found no {kind} expert weights in {type(model).__name__}")
    return _cpu(out)


def lora_meta(model: nn.Module, *, adapter: str = "default") -> dict:
    """`{"r", "alpha", "scaling", "targets"}` of the MLP LoRA in a peft-wrapped dense model (for `ExpertSet.meta`)."""
    _, layers = find_decoder_layers(model)
    hidden = text_config(model).hidden_size
    found = {}
    for layer in layers:
        _, ffn = find_ffn(layer, hidden)
        for name, module in ffn.named_children():
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and adapter in module.lora_A:
                found[name] = (module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter])
    if not found:
        raise ConfigError(f"found no MLP LoRA named {adapter!r} in {type(model).__name__}")
    if len(set(found.values())) != 1:
        raise ConfigError(f"MLP LoRAs differ in rank/alpha across projections: {found}")
    r, alpha, scaling = next(iter(found.values()))
    return {"r": int(r), "alpha": float(alpha), "scaling": float(scaling), "targets": sorted(found)}
