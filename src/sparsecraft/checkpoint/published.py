"""Import of the published PESC checkpoints (Camelidae, Qwen2idae, Sparsetral), never running their code (export:
`published_export`).

The published directories declare a plain `model_type` (llama / qwen2 / mistral) and point at their own classes
through `auto_map`, so plain transformers would build a dense model and silently drop every adapter. Here the
layout is recognised by its config fields, the dense base is built with plain transformers from the same config
minus the MoE fields, crafted with `sparsecraft.craft`, and every tensor is loaded strictly: a checkpoint with an
unused, missing or mis-shaped tensor is refused with a `CheckpointError` naming the first offending key.

Key layouts per decoder layer `i` (published -> sparsecraft, stacked over experts):

    model.layers.{i}.mlp.moe_adapter.router.weight                       [E, h] -> ...mlp.moe.router.weight [E, h]
    model.layers.{i}.mlp.moe_adapter.experts.expert_{e}.adapter_down.weight [r, h] -> ...mlp.moe.experts.down [E, r, h]
    model.layers.{i}.mlp.moe_adapter.experts.expert_{e}.adapter_up.weight   [h, r] -> ...mlp.moe.experts.up   [E, h, r]

Sparsetral uses `experts.{e}.` (a ModuleList) instead of `experts.expert_{e}.`; Qwen2idae uses Camelidae's names.

Routing and combine chosen on import (from the reference code, as summarised in the PESC spec):
- Camelidae / Qwen2idae: top-k of the logits, softmax over the k kept (`topk_softmax`), router run in the
  model's dtype (`router_dtype="model"`; the `moe_dtype` field is ignored, as the reference ignores it), combine
  `sum_j g_j (F + A_j(F))` (`combine="per_slot"`: each slot's term in the model dtype, added in expert order),
  so bf16 outputs equal the spec's reference form bit for bit (tests/test_craft.py).
- Sparsetral: softmax over all E in fp32, top-k, renormalised (`softmax_topk`, `router_dtype="float32"`). The
  spec names only the router as different; its experts are the same Camelidae-derived modules summed per slot,
  so `combine="per_slot"` is kept as well (identical to `residual` in fp32 either way).
Missing fields take the reference defaults: topk=1, adapter_dim=64, moe_scaling=0.25, num_experts=8.
The Camelidae modeling code hard-codes a RoPE base of 10000; a config with another `rope_theta` is loaded as
written, with a warning.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..craft import craft
from ..errors import CheckpointError, ConfigError
from ..surgery import craft_config_of, text_config
from .crafted import read_config

LAYOUTS = ("camelidae", "qwen2idae", "sparsetral")
_DEFAULTS = {"num_experts": 8, "topk": 1, "adapter_dim": 64, "moe_scaling": 0.25}
# config fields of the published MoE classes; removed before building the plain base config
_MOE_FIELDS = ("num_experts", "topk", "adapter_dim", "moe_scaling", "moe_dtype", "output_router_logits",
               "adapter_dropout", "router_aux_loss_coef", "auto_map")
_EXPERT_PART = {"camelidae": r"expert_(\d+)", "qwen2idae": r"expert_(\d+)", "sparsetral": r"(\d+)"}
# `model_type`s the published configuration classes declare -> the transformers family their base is
_BASE_FAMILY = {"sparsetral": "mistral", "camelidae": "llama", "qwen2idae": "qwen2"}
MOE_TENSOR = re.compile(r"^(.+)\.moe\.(router\.weight|experts\.down|experts\.up)$")
_PICKLE_HELP = ("unpickling can run arbitrary code, so it is refused by default; pass allow_pickle=True "
                "(CLI: --allow-pickle) once, then export_published() it to safetensors")


def detect_published_layout(config: dict) -> str | None:
    """`"camelidae"`, `"qwen2idae"`, `"sparsetral"` or None for a config.json dict.

    Decided by an `auto_map` naming the published classes, or by the MoE fields (`num_experts` + `adapter_dim` +
    `moe_scaling`/`topk`); `model_type` only tells Qwen2idae from Camelidae once those fields are there.
    """
    auto_map = config.get("auto_map") or {}
    names = " ".join(map(str, auto_map.values() if isinstance(auto_map, dict) else auto_map)).lower()
    for layout in ("sparsetral", "qwen2idae", "camelidae"):
        if layout in names:
            return layout
    if config.get("model_type") in _BASE_FAMILY:  # Sparsetral's config says `model_type: sparsetral`
        return config["model_type"]
    if not ("num_experts" in config and "adapter_dim" in config and ("moe_scaling" in config or "topk" in config)):
        return None
    if "adapter_dropout" in config:
        return "sparsetral"
    if config.get("model_type") == "qwen2":
        return "qwen2idae"
    return "sparsetral" if "router_aux_loss_coef" in config else "camelidae"


def published_craft_config(config: dict, layout: str | None = None) -> CraftConfig:
    """The `CraftConfig` that computes what the published code of `layout` computes for this config.json dict."""
    layout = layout or detect_published_layout(config)
    if layout not in LAYOUTS:
        raise CheckpointError("config.json is not a published PESC layout (no num_experts/adapter_dim/auto_map)")
    field = {k: config[k] if config.get(k) is not None else v for k, v in _DEFAULTS.items()}
    common = dict(num_experts=int(field["num_experts"]), top_k=int(field["topk"]),
                  adapter_dim=int(field["adapter_dim"]), scaling=float(field["moe_scaling"]),
                  activation="gelu", combine="per_slot", normalize_topk=True)
    try:
        if layout == "sparsetral":
            dropout = config.get("adapter_dropout")
            return CraftConfig(**common, routing="softmax_topk", router_dtype="float32",
                               dropout=0.1 if dropout is None else float(dropout),
                               aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.01))
        # the reference training code uses dropout 0.1 and alpha 0.01 (0.02 in the Qwen2idae code)
        return CraftConfig(**common, routing="topk_softmax", router_dtype="model", dropout=0.1,
                           aux_loss_coef=0.02 if layout == "qwen2idae" else 0.01)
    except ConfigError as exc:
        raise CheckpointError(f"config.json of a {layout} checkpoint: {exc}") from exc


def _published_names(prefix: str, layout: str, num_experts: int) -> dict[str, tuple[str, int | None]]:
    """Published key -> (sparsecraft key, expert index or None) for the MoE block under `prefix` (`...mlp`)."""
    expert = "expert_{}" if layout in ("camelidae", "qwen2idae") else "{}"
    names = {f"{prefix}.moe_adapter.router.weight": (f"{prefix}.moe.router.weight", None)}
    for e in range(num_experts):
        for proj in ("down", "up"):
            key = f"{prefix}.moe_adapter.experts.{expert.format(e)}.adapter_{proj}.weight"
            names[key] = (f"{prefix}.moe.experts.{proj}", e)
    return names


def alias_groups(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Key -> storage identity; tied weights (lm_head / embed_tokens) share one."""
    return {k: (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for k, t in state.items()}


# ----------------------------------------------------------------------------------------------- reading files

def _weight_files(root: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of a directory: safetensors (single or indexed shards), else pickled `.bin` shards."""
    for single, pattern in (("model.safetensors", "*.safetensors"), ("pytorch_model.bin", "pytorch_model*.bin")):
        index = root / f"{single}.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot read {index}: {exc}") from exc
            files = [root / n for n in names]
        else:  # the usual single file wins over stray extras (e.g. a PEFT adapter_model.safetensors)
            files = [root / single] if (root / single).is_file() else sorted(root.glob(pattern))
        if not files:
            continue
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists {missing[0].name}, which is not in {root}")
        if pattern.endswith(".bin") and not allow_pickle:
            raise CheckpointError(f"{root} holds only pickled weights ({files[0].name}): {_PICKLE_HELP}")
        return files
    raise CheckpointError(f"{root} has no weights (*.safetensors or pytorch_model*.bin)")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        yield from state.items()


# ----------------------------------------------------------------------------------------------------- loading

def _resolve_dtype(dtype: torch.dtype | str | None, config: dict) -> torch.dtype:
    name = dtype if dtype not in (None, "auto") else config.get("dtype") or config.get("torch_dtype") or "float32"
    if isinstance(name, torch.dtype):
        return name
    resolved = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r}")
    return resolved


def _build_base(config: dict, dtype: torch.dtype, device: torch.device | str | None) -> nn.Module:
    """The plain transformers causal LM of the config without its MoE fields, weights left uninitialised."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    fields = {k: v for k, v in config.items() if k not in _MOE_FIELDS and k not in ("model_type", "torch_dtype")}
    fields["dtype"] = str(dtype).replace("torch.", "")
    model_type = _BASE_FAMILY.get(config.get("model_type"), config.get("model_type"))
    try:
        base_config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"config.json: cannot build a '{model_type}' config: {exc}") from exc
    # every weight is overwritten below, and a missing one is an error, so skip the random init
    with torch.device(device or "cpu"), no_init_weights():
        model = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying that init_weights does
    return model


def load_published(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a published PESC checkpoint directory as a crafted sparsecraft model (eval mode).

    Args:
        path: directory with config.json and `*.safetensors` (single or sharded with an index); pickled
            `pytorch_model*.bin` shards only with `allow_pickle=True` (read with `weights_only=True`).
        dtype: dtype of every weight; default the config's `dtype`/`torch_dtype`, else float32.
        device: where the model is built; default CPU.

    Returns:
        The crafted model: MoE tensors stacked as `...mlp.moe.router.weight [E, h]`,
        `...mlp.moe.experts.down [E, r, h]`, `...mlp.moe.experts.up [E, h, r]` in every decoder layer.

    Raises:
        CheckpointError: not a PESC layout, pickled weights without `allow_pickle`, or a tensor that is unused,
            missing or of the wrong shape (the message names the first such key).
    """
    root = Path(path)
    config = read_config(root)
    layout = detect_published_layout(config)
    if layout is None:
        raise CheckpointError(f"{root}/config.json has no PESC fields (num_experts, adapter_dim, moe_scaling/topk) "
                              "or auto_map naming Camelidae/Sparsetral; load it as a plain transformers model")
    files = _weight_files(root, allow_pickle)
    model = published_skeleton(config, dtype=_resolve_dtype(dtype, config), device=device)
    craft_config = craft_config_of(model)
    if layout == "camelidae":
        rope = getattr(model.config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(model.config, "rope_theta", 10000.0))
        if theta != 10000.0:
            warnings.warn(f"{root}: the Camelidae reference code ignores rope_theta={theta} and uses 10000; "
                          "loaded with the config's value", stacklevel=2)
    _load_tensors(model, files, layout, craft_config, root)
    return model.eval()


def published_skeleton(config: dict, *, dtype: torch.dtype = torch.bfloat16,
                       device: torch.device | str | None = "meta") -> nn.Module:
    """The crafted model a published config.json describes, its weights not loaded (on the meta device by
    default): structure and parameter counts without reading a file."""
    layout = detect_published_layout(config)
    if layout is None:
        raise CheckpointError("config.json is not a published PESC layout (no num_experts/adapter_dim/auto_map)")
    return craft(_build_base(config, dtype, device), published_craft_config(config, layout))


@torch.no_grad()
def _load_tensors(model: nn.Module, files: list[Path], layout: str, cfg: CraftConfig, root: Path) -> None:
    state = model.state_dict()  # tensors share storage with the parameters: copy_ loads in place
    hidden = text_config(model).hidden_size
    moe = {}
    for key in state:
        match = MOE_TENSOR.match(key)
        if match and match.group(2) == "router.weight":
            moe.update(_published_names(match.group(1), layout, cfg.num_experts))
    expected_moe = {"router.weight": (cfg.num_experts, hidden), "experts.down": (cfg.adapter_dim, hidden),
                    "experts.up": (hidden, cfg.adapter_dim)}
    shapes = {}
    for key, (target, _) in moe.items():
        shapes[key] = expected_moe[MOE_TENSOR.match(target).group(2)]
    filled: set[tuple[str, int | None]] = set()
    for key, tensor in _iter_tensors(files):
        if key in moe:
            target, expert = moe[key]
            dest = state[target] if expert is None else state[target][expert]
            expected = shapes[key]
        elif key in state and not MOE_TENSOR.match(key):
            target, expert, dest = key, None, state[key]
            expected = tuple(dest.shape)
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved this recomputed buffer
        else:
            what = "an MoE/adapter tensor" if ("adapter" in key or "router" in key or "expert" in key) else "a tensor"
            raise CheckpointError(f"{root}: {key} is {what} that the {layout} layout with num_experts="
                                  f"{cfg.num_experts} does not use; refusing to drop it")
        if tuple(tensor.shape) != tuple(expected):
            raise CheckpointError(f"{root}: {key} has shape {list(tensor.shape)}, expected {list(expected)} from "
                                  f"config.json (num_experts={cfg.num_experts}, adapter_dim={cfg.adapter_dim}, "
                                  f"hidden_size={hidden})")
        dest.copy_(tensor)
        filled.add((target, expert))
    # a key is satisfied if it or a weight tied to it (same storage) was loaded
    groups = alias_groups(state)
    done = {groups[t] for t, e in filled if e is None}
    for key in state:
        if not MOE_TENSOR.match(key) and (key, None) not in filled and groups[key] not in done:
            raise CheckpointError(f"{root}: {key} is missing from the checkpoint")
    for key, (target, expert) in moe.items():
        if (target, expert) not in filled:
            raise CheckpointError(f"{root}: {key} is missing from the checkpoint")


# ----------------------------------------------------------------------------------------------------- export
