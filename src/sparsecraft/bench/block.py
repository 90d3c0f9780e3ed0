"""Block level: the MoE block alone, forward + backward.

Every variant reads the same input `x [N, h]` (which needs a gradient, as inside a model being tuned) and
receives the same output gradient. The FFN is frozen and shared by all variants; routers and adapters (or the
upcycled FFN copies) train.

- `dense`: the FFN alone, `y = FFN(x)`.
- `pesc`, `pesc-<path>`: `y = PescMoE(x, FFN(x))` with that dispatch path (`pesc` = auto).
- `loop`: `y = LoopPescBlock(x, FFN(x))`, the bench's per-expert boolean-mask reference, same weights.
- `upcycle`: `y = UpcycledMoE(x)`, top-k of E trainable copies of the FFN behind a router.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..moe.layers import PescMoE
from ..moe.upcycle import UpcycledMoE, gated_weights, make_experts
from .base import Variant, autocast_for, block_ffn, pesc_path, upcycle_path
from .flops import MoEDims, block_flops, ffn_macs
from .reference import LoopPescBlock
from .settings import BenchSettings, dispatch_of


def build_block_variants(settings: BenchSettings, methods: list[str], device: torch.device) -> list[Variant]:
    """Build every method's block around one shared frozen FFN; nothing runs yet."""
    ffn = block_ffn(settings, device)
    hidden = next(ffn.parameters()).shape[-1]
    dims = MoEDims(hidden, ffn_macs(ffn), settings.experts, settings.top_k, settings.adapter_dim)
    gen = torch.Generator().manual_seed(settings.seed)
    x0 = torch.randn(settings.tokens, hidden, generator=gen).to(device, settings.torch_dtype)
    grad_out = torch.randn(settings.tokens, hidden, generator=gen).to(device, settings.torch_dtype)
    return [_block_variant(m, ffn, x0, grad_out, settings, dims, device) for m in methods]


def make_pesc_block(settings: BenchSettings, method: str, hidden: int, device: torch.device) -> nn.Module:
    """A freshly initialised PESC block (or the loop reference with the same weights), seeded so that every
    PESC variant has identical router and adapters and so routes identically."""
    cfg = settings.craft_config("auto" if method == "loop" else dispatch_of(method))
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        moe = PescMoE(hidden, cfg, 0, device=device, dtype=settings.torch_dtype, router_dtype=torch.float32)
    return LoopPescBlock.from_pesc(moe) if method == "loop" else moe


def _block_variant(method: str, ffn: nn.Module, x0: torch.Tensor, grad_out: torch.Tensor,
                   settings: BenchSettings, dims: MoEDims, device: torch.device) -> Variant:
    x = x0.clone().requires_grad_(True)  # the block's input needs a gradient, as inside a model
    tokens, hidden = x.shape
    if method == "dense":
        module, forward, path = None, (lambda: ffn(x)), "-"
    elif method == "upcycle":
        source = ffn if gated_weights(ffn) is not None else copy.deepcopy(ffn)  # the fallback trains its input
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            module = UpcycledMoE(make_experts(source, settings.experts), hidden, settings.craft_config("auto"), 0,
                                 device=device, router_dtype=torch.float32)
        forward, path = (lambda: module(x)), upcycle_path(module.experts, tokens, settings, hidden, device)
        for p in module.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    else:
        module = make_pesc_block(settings, method, hidden, device)
        forward = lambda: module(x, ffn(x))  # noqa: E731
        path = "loop" if method == "loop" else pesc_path(dispatch_of(method), tokens, settings, hidden, device)
    trainable = [x] + ([p for p in module.parameters() if p.requires_grad] if module is not None else [])
    if module is not None:
        module.train()
    autocast = autocast_for(settings, device)

    def step() -> None:
        with autocast():
            y = forward()
        y.backward(grad_out.to(y.dtype))

    def reset() -> None:
        for p in trainable:
            p.grad = None

    return Variant(
        level="block", method=method, path=path, tokens=tokens,
        flops=block_flops(method, tokens, dims), flops_executed=block_flops(method, tokens, dims, executed=True),
        step=step, reset=reset, extra={"module": module, "input": x},
    )
