"""Which base layers an NF4 run quantises, and the NF4 rounding of their weights without keeping them 4-bit.

A QLoRA run trains its adapters against `dequantize(quantize_nf4(W))`, not `W`. Loading the trained model over
the full-precision base shifts every quantised layer by its rounding error (logits off by ~0.07 on a tiny model);
rounding those weights the same way at load (`load(..., as_trained=True)`) gives exactly the model that was
trained and evaluated, in full precision. Which one generates better is an empirical matter: on SmolLM2-135M the
full-precision base is far better (docs/results.md), so it stays the default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SKIP_MODULES = ("lm_head",)  # bitsandbytes leaves the output head in 16/32 bit


def nf4_targets(model: nn.Module, skip: tuple[str, ...] = SKIP_MODULES) -> list[tuple[str, nn.Linear]]:
    """The plain `nn.Linear` layers an NF4 run quantises: all but `skip` names and sparsecraft's `.moe.` modules
    (routers, adapters and experts stay as they are)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.split(".")[-1] not in skip and ".moe." not in f".{name}."
    ]


@torch.no_grad()
def round_trip_nf4(model: nn.Module, skip: tuple[str, ...] = SKIP_MODULES) -> int:
    """Replace each target's weight `[out, in]` by its NF4 (double-quantised, bitsandbytes' default block size)
    de-quantisation, in the weight's own dtype and device. Returns how many layers were rounded."""
    import bitsandbytes.functional as bnbf

    targets = nf4_targets(model, skip)
    for _, linear in targets:
        weight = linear.weight
        packed, state = bnbf.quantize_4bit(weight.data.to("cpu", torch.float32).contiguous(), quant_type="nf4",
                                           compress_statistics=True)
        weight.data = bnbf.dequantize_4bit(packed, state).to(weight.device, weight.dtype)
    return len(targets)
