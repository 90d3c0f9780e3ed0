"""Existing experts instead of the dense stage: PEFT LoRA adapters (kind lora) or full checkpoints (kind ffn)
of the same base, read into an ExpertSet; what they trained outside the FFN becomes `ExpertSet.shared`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..methods import expert_kinds, method_for_kind
from ..methods.expert_set import ExpertSet
from ..sources import load_base_model, resolve_base
from ..surgery import is_crafted
from .readout import combine_shared, cpu_copy, ffn_modules


def expert_name(path: Path) -> str:
    """A label for an expert folder: its name, or its parent's for generic names (`run/model/lora` -> `run`)."""
    for part in reversed(path.resolve().parts):
        if part not in ("lora", "model", "adapter", "checkpoint", "final"):
            return part
    return path.name


def _peft_dir(path: Path) -> Path | None:
    """The PEFT adapter folder of `path`: itself, or a sparsecraft dense model's `lora/`."""
    for candidate in (path, path / "lora"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _read_peft(path: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter config, {module name: (A [r, in], B [out, r])}) of a PEFT LoRA adapter folder."""
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ConfigError(f"{path}: only plain LoRA adapters can be experts (found {config.get('peft_type')}"
                          f"{', DoRA' if config.get('use_dora') else ''})")
    if config.get("fan_in_fan_out"):
        raise ConfigError(f"{path}: fan_in_fan_out LoRA (GPT-2 Conv1D) adapters are not supported")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no adapter_model.safetensors (pickled .bin adapters are not read)")
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if match is None:
            raise ConfigError(f"{path}: unsupported adapter tensor {key} (only LoRA A/B of linear layers)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value.float()
    incomplete = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise CheckpointError(f"{path}: LoRA module {incomplete[0]} lacks its A or B matrix")
    return config, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def _lora_scaling(config: dict, module: str, r: int) -> float:
    """The adapter's scaling of `module` (its full name): `alpha_pattern` keys matched as PEFT matches them (the
    module's last names, or a regular expression), else `lora_alpha`."""
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), config.get("lora_alpha", r))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def lora_experts_from_peft(paths: list[Path], base_model: nn.Module, shared_mode: str, kind: str) -> ExpertSet:
    """PEFT LoRA adapters of the same base as experts: FFN LoRA -> expert states (padded to the largest rank,
    each adapter's own scaling folded into B), other LoRA -> merged into `shared`. base = zeros."""
    ffn_names = {qual: i for i, qual, _ in ffn_modules(base_model)}
    experts, deltas = [], []
    for path in paths:
        config, modules = _read_peft(path)
        state: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        delta = {}
        for module, (a, b) in modules.items():
            owner = next((q for q in ffn_names if module.startswith(q + ".")), None)
            scaling = _lora_scaling(config, module, a.shape[0])
            if owner is None:
                delta[f"{module}.weight"] = scaling * (b @ a)
            else:
                state[f"layers.{ffn_names[owner]}.{module[len(owner) + 1:]}"] = (a, b, scaling)
        if not state:
            raise ConfigError(f"{path} has no LoRA on the FFN projections: LoRA experts are FFN LoRA")
        experts.append(state)
        deltas.append(delta)
    keys = sorted(set().union(*experts))
    r = max(a.shape[0] for e in experts for a, _, _ in e.values())
    scalings = {s for e in experts for _, _, s in e.values()}
    ranks = {a.shape[0] for e in experts for a, _, _ in e.values()}
    common = scalings.pop() if len(scalings) == 1 and len(ranks) == 1 else 1.0
    shapes = {}
    for e in experts:
        for key, (a, b, _) in e.items():
            shapes[key] = (a.shape[1], b.shape[0])
    states = []
    for e in experts:
        state = {}
        for key in keys:
            fan_in, fan_out = shapes[key]
            a_full, b_full = torch.zeros(r, fan_in), torch.zeros(fan_out, r)
            if key in e:  # a module an adapter did not train is a zero LoRA there
                a, b, scaling = e[key]
                a_full[: a.shape[0]] = a
                b_full[:, : b.shape[1]] = b * (scaling / common)
            state[f"{key}.lora_A"], state[f"{key}.lora_B"] = a_full, b_full
        states.append(state)
    all_deltas = sorted(set().union(*deltas))
    deltas = [{k: d.get(k, torch.zeros(0)) for k in all_deltas} for d in deltas]
    for d in deltas:  # a module an adapter did not train has a zero delta
        for k, v in d.items():
            if v.numel() == 0:
                d[k] = torch.zeros(base_model.state_dict()[k].shape)
    shared = combine_shared(deltas, shared_mode, base_model)
    base = {k: torch.zeros_like(v) for k, v in states[0].items()}
    meta = {"r": r, "alpha": common * r, "scaling": common, "targets": sorted({k.split(".", 2)[2] for k in keys}),
            "source": "peft-adapters", "paths": [str(p) for p in paths]}
    return ExpertSet(kind=kind, states=states, base=base, shared=shared, meta=meta,
                     names=[expert_name(p) for p in paths])


def ffn_experts_from_checkpoints(paths: list[Path], base_model: nn.Module, shared_mode: str,
                                 kind: str, allow_pickle: bool = False) -> ExpertSet:
    """Full checkpoints of the same base as experts: their FFNs -> experts, other weights -> `shared`
    (`average`: mean of the checkpoints, `last`: the last one's, `base`: none). base = the base's FFNs."""
    from ..loading import load

    def ffn_state(model) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{n}": cpu_copy(p) for i, _, ffn in ffn_modules(model)
                for n, p in ffn.named_parameters()}

    ffn_prefixes = tuple(qual + "." for _, qual, _ in ffn_modules(base_model))
    base_weights = base_model.state_dict()
    states, others = [], []
    for path in paths:
        model = load(path, dtype=torch.float32, allow_pickle=allow_pickle)
        if is_crafted(model):
            raise ConfigError(f"{path} is a mixture-of-experts model; FFN experts come from dense checkpoints")
        weights = model.state_dict()
        for key, value in base_weights.items():
            if key not in weights or weights[key].shape != value.shape:
                raise ConfigError(f"{path} is not a checkpoint of the same base: {key} differs")
        states.append(ffn_state(model))
        others.append({k: (v.float() - base_weights[k].float()).cpu() for k, v in weights.items()
                       if not k.startswith(ffn_prefixes)})
        del model
    shared = combine_shared(others, shared_mode, base_model)
    return ExpertSet(kind=kind, states=states, base=ffn_state(base_model), shared=shared,
                     meta={"source": "checkpoints", "paths": [str(p) for p in paths], "shared_mode": shared_mode},
                     names=[expert_name(p) for p in paths])


def experts_from_paths(paths: list[str | Path], model: str, kind: str, shared: str = "average",
                       allow_pickle: bool = False) -> ExpertSet:
    """Existing experts instead of the dense stage.

    kind `lora`: PEFT LoRA adapter folders (or sparsecraft `method: dense` model folders holding `lora/`) of the
    base `model`; kind `ffn`: full checkpoints of it (transformers folders, or sparsecraft dense folders whose
    LoRA is merged on load). `shared`: average | last | base, as `prepare.shared`.
    """
    if len(paths) < 1:
        raise ConfigError("prepare.experts_from is empty")
    resolved = [Path(p) for p in paths]
    for p in resolved:
        if not p.is_dir():
            raise CheckpointError(f"expert path not found: {p}")
    base_model = load_base_model(resolve_base(model), dtype=torch.float32, allow_pickle=allow_pickle)
    source = method_for_kind(kind).upit_existing
    if source == "peft":
        peft_dirs = [_peft_dir(p) for p in resolved]
        bad = [p for p, d in zip(resolved, peft_dirs) if d is None]
        if bad:
            raise ConfigError(f"{bad[0]} is not a PEFT LoRA adapter folder (no adapter_config.json)")
        es = lora_experts_from_peft(peft_dirs, base_model, shared, kind)
    elif source == "checkpoint":
        es = ffn_experts_from_checkpoints(resolved, base_model, shared, kind, allow_pickle)
    else:
        takers = ", ".join(k for k in expert_kinds() if method_for_kind(k).upit_existing)
        raise ConfigError(f"existing experts can be of kind {takers}, not kind {kind}")
    es.meta["model"] = model
    return es
