"""The directory vLLM loads a PESC model from (`sparsecraft export MODEL OUT --to vllm`).

config.json is the base family's own config (LLaMA, Mistral, Qwen2, ...) with `architectures:
["SparsecraftPescForCausalLM"]` and a `sparsecraft` entry (method, base architecture, crafting settings, crafted
layers); model.safetensors holds the whole model: the base weights (LoRA merged) under the base's keys and the
routers/adapters under sparsecraft's (`model.layers.{i}.mlp.moe.router.weight`, `...moe.experts.down/up`).
The tokenizer and generation config are copied. Only vLLM with the sparsecraft plugin loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...atomic import atomic_directory
from ...errors import CheckpointError, ConfigError
from ...methods import method_of
from ...surgery import craft_config_of, crafted_layers, text_config
from . import ARCHITECTURE


def check_servable(model) -> None:
    method = method_of(model).name
    if method != "pesc":
        hint = " (use --to mixtral/qwen2_moe/qwen3_moe: vLLM serves those natively)" if method == "upcycle" else ""
        raise ConfigError(f"--to vllm writes PESC models for the sparsecraft vLLM plugin; this is {method}{hint}")
    if craft_config_of(model).combine not in ("residual", "per_slot"):
        raise ConfigError(f"unknown combine form {craft_config_of(model).combine!r}")


def vllm_config_dict(model) -> dict:
    base_cls = getattr(type(model), "_sparsecraft_base_class", type(model))
    config = text_config(model).to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [ARCHITECTURE]
    config["sparsecraft"] = {"method": "pesc", "format": 1, "base_architecture": base_cls.__name__,
                             "craft": craft_config_of(model).to_dict(),
                             "crafted_layers": [i for i, _ in crafted_layers(model)]}
    return config


def write_vllm_dir(model, out_dir: str | os.PathLike, *, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a PESC model, LoRA already merged) for vLLM with the sparsecraft plugin."""
    check_servable(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty")
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.clone().contiguous()  # clones: tied weights share storage
    config = vllm_config_dict(model)
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "sparsecraft"})
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
