"""UpIT's expert material on disk: expert sets (one state per expert) and pre-trained router rows.

An `ExpertSet` holds E expert states of one kind under canonical keys `layers.{i}.{rest}` (`expert_keys.py`);
the kind names the method whose MoE it builds (`registry.method_for_kind`: `adapter` -> PESC, `ffn` -> Sparse
Upcycling, `lora` -> LoRA experts), and that method checks the keys and reads and loads the states.
`base` is the reference point of the deltas (the initial adapter / LoRA state, or the dense FFN); `shared`
holds full tensors under the model's own state-dict keys (e.g. averaged attention weights), loaded into the
model before the MoE is built (`sparsecraft.save` keeps them, see `checkpoint/crafted.py`).

On disk (`save_expert_set`): `experts.json` (kind, names, meta, keys) + `expert_{j}.safetensors`,
`base.safetensors`, `shared.safetensors`, written atomically. Router rows: `layers.{i}.router [E, h]`.
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

from ..atomic import atomic_directory, atomic_write
from ..errors import CheckpointError, ConfigError
from ..moe.layers import RoutedBlock
from ..surgery import crafted_layers
from .expert_keys import KEY, layer_of
from .registry import expert_kinds, method_for_kind

INDEX_NAME = "experts.json"
BASE_NAME = "base.safetensors"
SHARED_NAME = "shared.safetensors"
ROUTER_NAME = "router.safetensors"
FORMAT_VERSION = 1


def _expert_file(j: int) -> str:
    return f"expert_{j}.safetensors"


@dataclass
class ExpertSet:
    """E expert states of one kind (see the module docstring for keys, `base` and `shared`).

    Attributes:
        kind: an expert kind of a registered method (`lora`, `ffn`, `adapter`).
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
        return sorted({layer_of(k) for k in self.base})

    def validate(self) -> None:
        """ConfigError (one line) for the first inconsistency: kind, counts, keys, shapes, key syntax."""
        if self.kind not in expert_kinds():
            raise ConfigError(f"expert kind must be one of {', '.join(expert_kinds())}; got {self.kind!r}")
        if not self.states:
            raise ConfigError("an expert set needs at least one expert state")
        if len(self.names) != len(self.states):
            raise ConfigError(f"expert set has {len(self.states)} states but {len(self.names)} names")
        if not self.base:
            raise ConfigError("expert set has an empty base state")
        bad = next((k for k in self.base if not KEY.match(k)), None)
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
        method_for_kind(self.kind).check_expert_keys(shapes)


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clones: views of one storage (tied or stacked weights) are refused by safetensors
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}


def expert_state(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """One expert state of `kind` (fp32 CPU copies, canonical keys) read from a dense-stage model."""
    out = method_for_kind(kind).read_expert_state(model)
    if not out:
        raise ConfigError(f"found no {kind} expert weights in {type(model).__name__}")
    return {k: v.float() for k, v in cpu_copies(out).items()}


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
            save_file(cpu_copies(state), str(tmp / _expert_file(j)), metadata={"name": es.names[j]})
        save_file(cpu_copies(es.base), str(tmp / BASE_NAME))
        save_file(cpu_copies(es.shared), str(tmp / SHARED_NAME))
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


# ------------------------------------------------------------------------------------------------ router rows


def router_rows(model: nn.Module) -> dict[int, torch.Tensor]:
    """`{decoder layer index: router weight [E, h]}` of every MoE block of a model (fp32 copies on the CPU)."""
    rows = {m.layer_index: m.router.weight.detach().float().cpu().clone()
            for m in model.modules() if isinstance(m, RoutedBlock)}
    if not rows:
        raise ConfigError("the model has no MoE router")
    return dict(sorted(rows.items()))


def save_router(rows: dict[int, torch.Tensor], path: str | Path) -> Path:
    """Write `{layers.{i}.router: [E, h]}` atomically."""
    from safetensors.torch import save as save_bytes

    path = Path(path)
    atomic_write(path, save_bytes({f"layers.{i}.router": w.contiguous() for i, w in rows.items()}))
    return path


def load_router(path: str | Path) -> dict[int, torch.Tensor]:
    """Read a router file written by `save_router`: `{decoder layer index: [E, h]}`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"router file not found: {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is corrupted or truncated: {exc}") from exc
    rows = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"layers\.(\d+)\.router", key)
        if match is None or value.dim() != 2:
            raise CheckpointError(f"{path}: unexpected tensor {key} {tuple(value.shape)} (want layers.{{i}}.router "
                                  "[E, h])")
        rows[int(match.group(1))] = value
    return dict(sorted(rows.items()))


def states_from_moe(model: nn.Module, es: ExpertSet) -> list[dict[str, torch.Tensor]]:
    """The experts' states read back from an MoE built from `es` (`methods.upit.build_moe`), under `es`'s keys,
    as fp32 CPU copies (for router pre-training with unfrozen experts)."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in es.states]
    for i, mlp in crafted_layers(model):
        for e, state in enumerate(states):
            for rest, value in mlp.moe.experts.expert_weights(e).items():
                key = f"layers.{i}.{rest}"
                if key in es.base:
                    state[key] = value.detach().float().cpu().clone()
    return states
