"""Writing a crafted PESC model in a published layout (Camelidae / Qwen2idae, Sparsetral), the reverse of
`published.load_published`: config.json with the layout's MoE fields and safetensors under its key names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_directory
from ..errors import CheckpointError
from ..methods import method_of
from ..moe.balance import is_balance_bias, selection_biases
from ..surgery import craft_config_of, crafted_layers, is_crafted, text_config
from .published import MOE_TENSOR, alias_groups


def export_published(
    model: nn.Module,
    out_dir: str | os.PathLike,
    layout: str = "camelidae",
    *,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a crafted model as a published PESC checkpoint (config.json + safetensors), atomically.

    Args:
        model: a model crafted in every decoder layer with GELU adapters and a routing the layout can express
            (`topk_softmax`, or `softmax_topk` renormalised: the same function).
        layout: `"camelidae"` (`experts.expert_{e}.`; Qwen2idae for a qwen2 base) or `"sparsetral"` (`experts.{e}.`).
        shard_size: bytes per safetensors shard (with `model.safetensors.index.json`); None writes one file.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        `out_dir` as a Path. `load_published(out_dir)` gives the same logits. No `auto_map` is written (there is
        no remote code to point at); the layout is recognised by its MoE fields.
    """
    if layout not in ("camelidae", "sparsetral"):
        raise CheckpointError(f"layout must be 'camelidae' or 'sparsetral', got {layout!r}")
    if not is_crafted(model):
        raise CheckpointError("export_published needs a crafted model")
    method = method_of(model).name
    if method != "pesc":
        raise CheckpointError(f"the {layout} layout holds PESC's adapters on the FFN output; this model is crafted "
                              f"with {method} (sparsecraft export --to mixtral|qwen3_moe writes other methods)")
    cfg = craft_config_of(model)
    tcfg = text_config(model)
    if len(crafted_layers(model)) != tcfg.num_hidden_layers:
        raise CheckpointError(f"the {layout} layout has adapters in every decoder layer; this model has them in "
                              f"{len(crafted_layers(model))} of {tcfg.num_hidden_layers}")
    if cfg.activation != "gelu":
        raise CheckpointError(f"the {layout} layout uses exact GELU adapters; this model uses {cfg.activation}")
    if cfg.routing == "softmax_topk" and not cfg.normalize_topk:
        raise CheckpointError(f"the {layout} layout renormalises the top-k gates; this model does not")
    if any(bool(b.ne(0).any()) for b in selection_biases(model).values()):
        raise CheckpointError(f"the {layout} layout has no selection bias (loss-free balancing); this model's "
                              "biases are not zero")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; remove it, choose another path or pass overwrite=True")

    tensors = _export_tensors(model, layout, cfg.num_experts)
    base_cls = getattr(type(model), "_sparsecraft_base_class", type(model))
    config = model.config.to_dict()
    config.update(architectures=[base_cls.__name__], model_type=model.config.model_type,
                  num_experts=cfg.num_experts, topk=cfg.top_k, adapter_dim=cfg.adapter_dim,
                  moe_scaling=cfg.scaling, output_router_logits=False,
                  moe_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""))
    if layout == "sparsetral":
        config.update(adapter_dropout=cfg.dropout, router_aux_loss_coef=cfg.aux_loss_coef)
    _write_atomic(out, config, tensors, shard_size)
    return out


def _export_tensors(model: nn.Module, layout: str, num_experts: int) -> dict[str, torch.Tensor]:
    """Published key -> CPU tensor; tied aliases written once, stacked experts split per expert."""
    expert = "expert_{}" if layout == "camelidae" else "{}"
    state = model.state_dict()
    groups, seen, out = alias_groups(state), set(), {}
    for key, tensor in state.items():
        if is_balance_bias(key):
            continue  # all zero (export_published checked): choosing with them is choosing without
        match = MOE_TENSOR.match(key)
        if match is None:
            if groups[key] in seen:
                continue
            seen.add(groups[key])
            out[key] = tensor.detach().to("cpu").contiguous()
            continue
        prefix, part = match.groups()
        if part == "router.weight":
            out[f"{prefix}.moe_adapter.router.weight"] = tensor.detach().to("cpu").contiguous()
            continue
        proj = part.split(".")[1]
        for e in range(num_experts):
            # clone: safetensors refuses tensors that share storage
            name = f"{prefix}.moe_adapter.experts.{expert.format(e)}.adapter_{proj}.weight"
            out[name] = tensor[e].detach().to("cpu").clone()
    return out


def _write_atomic(out: Path, config: dict, tensors: dict[str, torch.Tensor], shard_size: int | None) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    with atomic_directory(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if shard_size is None:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
