"""Recipe -> trainable model: load the base (NF4 or not), apply the recipe's method (looked up in `methods/`),
add LoRA through peft, and leave exactly router, adapters/experts and LoRA trainable."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..hardware import cpu_bf16
from ..methods import Method, get_method
from ..moe.balance import is_balance_bias
from ..moe.dropout import use_lane_dropout
from ..moe.layers import set_adapter_compute_dtype
from ..sources import BaseSource, load_base_model, load_tokenizer, resolve_base
from ..surgery import is_added_name, is_crafted
from .quantize import bnb_config, keep_trainable_layout, quantize_linears_nf4
from .recipe import Recipe


@dataclass
class BuiltModel:
    model: nn.Module  # what the loop trains: a peft model when LoRA is on, else the (crafted) transformers model
    inner: nn.Module  # the transformers model inside (crafted, with LoRA layers injected when LoRA is on)
    tokenizer: object
    source: BaseSource
    compute_dtype: torch.dtype


def compute_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the frozen base for `precision`. `auto`: bf16 on CUDA devices that support it and on
    CPUs that compute bf16 in hardware (AMX-BF16 tiles or AVX512-BF16 dot products), where the real NF4 training
    step of PESC and dense ran 1.35-1.40x faster at the same losses (an Intel Xeon with AMX and an AMD EPYC with
    AVX512-BF16, docs/benchmarks.md); fp32 on other CPUs (AVX2), which convert bf16 around every op. Trainable
    weights stay fp32 either way."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16() is not None:
        return torch.bfloat16
    return torch.float32


def _quantize_after_method(recipe: Recipe, method: Method, source: BaseSource) -> bool:
    """NF4 applied in place after the method instead of on load: GGUF bases (transformers cannot quantise them
    on load) and methods whose experts are copies of base weights that train (they must stay full precision)."""
    return recipe.quantization == "nf4" and (bool(source.gguf_file) or method.experts_full_precision)


def _load_base(recipe: Recipe, method: Method, source: BaseSource, dtype: torch.dtype,
               device: torch.device) -> nn.Module:
    if recipe.quantization == "nf4" and not _quantize_after_method(recipe, method, source):
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")  # set by `accelerate launch`
        return load_base_model(source, dtype=dtype, quantization_config=bnb_config(dtype, sharded=fsdp),
                               device_map={"": device},
                               allow_pickle=recipe.allow_pickle)
    load_dtype = torch.float32 if source.gguf_file else dtype  # GGUF de-quantises to fp32
    return load_base_model(source, dtype=load_dtype, allow_pickle=recipe.allow_pickle).to(device)


def lora_targets(recipe: Recipe, model: nn.Module) -> list[str]:
    """Module-name suffixes for LoRA that exist in this model (FFN names only when `lora.ffn`)."""
    wanted = list(recipe.lora.targets) + (list(recipe.lora.ffn_targets) if recipe.lora.ffn else [])
    present = {name.split(".")[-1] for name, m in model.named_modules() if not is_added_name(name + ".")}
    found = [t for t in wanted if t in present]
    if not found:
        raise ConfigError(f"none of the LoRA targets {wanted} exist in {type(model).__name__}")
    return found


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (router losses need it, see `moe/model.py`); transformers before
    5.2x names it `gradient_checkpointing_enable`."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def build_model(recipe: Recipe, device: torch.device | str = "cpu") -> BuiltModel:
    """Load, quantise, craft/upcycle, LoRA-wrap and freeze according to the recipe."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    device = torch.device(device)
    method = get_method(recipe.method)
    source = resolve_base(recipe.model)
    dtype = compute_dtype_for(recipe.train.precision, device)
    model = _load_base(recipe, method, source, dtype, device)
    model._sparsecraft_base = source
    for p in model.parameters():
        p.requires_grad_(False)
    adapter_dtype = torch.float32 if recipe.adapter_dtype == "float32" else torch.bfloat16
    if method.builds_moe:
        if recipe.craft_config().constant_gate:
            print("note: top_k=1 with this routing gives every token a gate of exactly 1, so the router learns only "
                  "from the balance loss; for a Switch-style gate set craft.routing=softmax_topk "
                  "craft.normalize_topk=false")
        options = getattr(recipe, method.options_field) if method.options_field else None
        method.build(model, recipe.craft_config(), seed=recipe.train.seed, adapter_dtype=adapter_dtype,
                     options=options, explicit=tuple(recipe.craft))
    if _quantize_after_method(recipe, method, source):
        quantize_linears_nf4(model, compute_dtype=dtype)  # skips `.moe.` modules: routers/experts stay as they are
    if dtype != torch.float32:
        # PESC's adapters compute in the base's dtype too (fp32 weights, cast per call): on an AMX CPU this made the
        # quickstart's training step 1.24x -> 1.13x dense (docs/benchmarks.md)
        set_adapter_compute_dtype(model, dtype)
    if recipe.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_trainable_layout(model)
    inner = model
    if recipe.lora.enabled:
        config = LoraConfig(
            r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=lora_targets(recipe, inner), bias="none", task_type="CAUSAL_LM",
            exclude_modules=r".*\.moe\..*",  # never LoRA inside routers/experts (upcycled FFN copies share names)
        )
        model = get_peft_model(inner, config)
    # torch's CPU dropout draws a random number per element: 11 % of the quickstart's step (moe/dropout.py)
    use_lane_dropout(model)
    for name, p in inner.named_parameters():
        if is_added_name(name) and not is_balance_bias(name):  # the selection bias moves by rule, not gradient
            p.requires_grad_(True)
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(inner)
        inner.config.use_cache = False
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise ConfigError(f"base {recipe.model} has no tokenizer; training needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    assert not method.builds_moe or is_crafted(inner)
    return BuiltModel(model=model, inner=inner, tokenizer=tokenizer, source=source, compute_dtype=dtype)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
