"""NF4 base weights through bitsandbytes.

Bases that `from_pretrained` can quantise on load use `BitsAndBytesConfig` (the memory-efficient path). GGUF
bases cannot (transformers refuses to combine GGUF and quantisation), so their de-quantised Linear layers are
swapped for `bnb.nn.Linear4bit` in place. Either way it happens BEFORE crafting, so routers and adapters are
never quantised; `lm_head` stays in 16/32 bit as bitsandbytes leaves it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..nf4 import SKIP_MODULES, nf4_targets


def bnb_config(compute_dtype: torch.dtype, *, sharded: bool = False):
    """NF4 with double quantisation; `sharded` (FSDP): the packed 4-bit weights are stored in the compute dtype,
    as FSDP can only flatten parameters of one float dtype (PEFT's QLoRA + FSDP recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(SKIP_MODULES),
        **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
    )


def keep_trainable_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking NF4 weights for its CPU inference kernel.

    bitsandbytes 0.50 converts a `Linear4bit`'s weights in place to a CPU-only packed layout the first time it
    runs in eval mode on an AVX512-BF16 CPU, and never converts back: later training forwards go through
    `gemv_4bit`, which has no autograd kernel, so gradients through the layer are silently wrong. A held-out
    evaluation during training would trigger it. Returns the number of layers changed.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            changed += 1
    return changed


def quantize_linears_nf4(model: nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...] = SKIP_MODULES) -> int:
    """Replace every `nn.Linear` (except `skip` names and sparsecraft's `.moe.` modules) by an NF4
    double-quantised `Linear4bit` holding the same weights. Returns how many layers were replaced."""
    import bitsandbytes as bnb

    targets = nf4_targets(model, skip)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = linear.weight.device
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            quant_type="nf4", compress_statistics=True, device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data.to("cpu", torch.float32).contiguous(), requires_grad=False, quant_type="nf4",
            compress_statistics=True,
        )
        q.weight = weight._quantize(device) if device.type != "meta" else weight
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, q)
    model.is_loaded_in_4bit = True  # what peft's k-bit preparation looks for
    return len(targets)
