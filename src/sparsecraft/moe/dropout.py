"""Dropout whose mask costs a quarter of torch's on the CPU.

torch's CPU dropout takes one 64-bit draw (two mt19937 outputs) per element (`bernoulli_`: ~1.4 ms for a
[512, 576] mask on a 2-core Xeon, 11 % of a QLoRA training step of SmolLM2 at 4 x 128 tokens, where peft's LoRA
dropout runs 4 times per layer and PESC's adapter dropout once more). Here one 64-bit draw gives four 16-bit lanes
(each half of an mt19937 output: uniform and independent); an element is dropped when its lane, shifted to
[0, 65536), is below `round(p * 65536)`, so the rate is p rounded to 1/65536 and kept values are scaled by 1 / (1 - that
rate): unbiased, as torch's is. The draws come from torch's default CPU generator, so `torch.manual_seed`,
checkpointed RNG state and activation checkpointing's replay govern them as they govern `F.dropout`. The backward
keeps a bool mask (torch's CPU dropout keeps one in the input's dtype: 4 bytes per element in fp32).

CUDA tensors (their dropout is one fused kernel already), torch.compile / torch.export tracing and rates that round
to 0 or 1 use `F.dropout`. Not supported: torch.func transforms (`grad`, `vmap`) and TorchScript of `LaneDropout`;
nothing in sparsecraft uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # 16-bit lanes: the rate's resolution


class _KeepAndScale(torch.autograd.Function):
    """`x * keep * scale` with the bool `keep` saved for the backward (not a float mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, float]:
    """A CPU bool mask of `shape`, each element True with probability 1 - p' (p' = p rounded to 1/65536), and
    the scale 1 / (1 - p') that keeps kept values unbiased. ValueError when p' is 0 or 1 (or p outside [0, 1])."""
    drop = round(p * LANES)
    if not 0 < drop < LANES:
        raise ValueError(f"dropout rate {p!r} rounds to {drop}/{LANES}: needs 0 < p' < 1")
    numel = math.prod(shape)
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-2**63, None, generator=generator)
    lanes = bits.view(torch.int16)[:numel].view(shape)  # signed: uniform on [-32768, 32767]
    return lanes >= drop - LANES // 2, LANES / (LANES - drop)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)` in distribution, with the mask drawn four elements per random number on the
    CPU (see the module docstring). Any shape; returns x's shape and dtype."""
    if not training or p == 0.0:
        return x
    drop = round(p * LANES)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < drop < LANES:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p)
    return _KeepAndScale.apply(x, keep, scale)


class LaneDropout(nn.Dropout):
    """`nn.Dropout` through `dropout` above (a subclass, so code that checks for `nn.Dropout` still finds it).
    `inplace` is not honoured: the output is always a new tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_lane_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` with a rate above 0 in `model` (peft's LoRA dropout, the base model's own if
    any) for `LaneDropout` with the same rate, in place; returns how many were swapped. Dropout has no parameters,
    so nothing saved changes."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout and child.p > 0]
    for parent, name, child in swaps:
        setattr(parent, name, LaneDropout(child.p))
    return len(swaps)
