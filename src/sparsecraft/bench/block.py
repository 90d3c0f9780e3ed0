"""Block level: the MoE block alone, forward + backward.

Every variant reads the same input `x [N, h]` (which needs a gradient, as inside a model being tuned) and
receives the same output gradient. The FFN is frozen and shared by all variants; routers and adapters (or the
upcycled FFN copies) train.

- `dense`: the FFN alone, `y = FFN(x)`.
- any registered method, `<method>-<path>` with a forced dispatch path: the method's own block around the FFN
  (`Method.standalone_block`): `PescMoE(x, FFN(x))`, `UpcycledMoE(x)` (top-k of E trainable FFN copies),
  the LoRA-expert block of `mixlora`.
- `loop`: `y = LoopPescBlock(x, FFN(x))`, the bench's per-expert boolean-mask reference, PESC's weights.
- `pesc:compiled`, `pesc-<path>:compiled`: PESC's block with its math under torch.compile (`moe/compiled.py`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe.compiled import compile_moe_blocks
from .base import Variant, autocast_for, block_ffn, dispatch_label
from .flops import MoEDims, block_flops, ffn_macs
from .reference import LoopPescBlock
from .settings import BASELINE, REFERENCE, BenchSettings, is_compiled_variant, parse_variant


def build_block_variants(settings: BenchSettings, methods: list[str], device: torch.device) -> list[Variant]:
    """Build every method's block around one shared frozen FFN; nothing runs yet."""
    ffn = block_ffn(settings, device)
    hidden = next(ffn.parameters()).shape[-1]
    dims = MoEDims(hidden, ffn_macs(ffn), settings.experts, settings.top_k, settings.adapter_dim)
    gen = torch.Generator().manual_seed(settings.seed)
    x0 = torch.randn(settings.tokens, hidden, generator=gen).to(device, settings.torch_dtype)
    grad_out = torch.randn(settings.tokens, hidden, generator=gen).to(device, settings.torch_dtype)
    return [_block_variant(m, ffn, x0, grad_out, settings, dims, device) for m in methods]


def make_block(settings: BenchSettings, name: str, ffn: nn.Module, hidden: int, device: torch.device):
    """`(block, forward)` of a variant, freshly initialised with the bench seed (so every variant of one method
    has identical router and experts and routes identically); `loop` is PESC's block re-run by the reference."""
    method, dispatch = parse_variant(name)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        block, forward = method.standalone_block(ffn, hidden, settings.craft_config(dispatch), device=device,
                                                 dtype=settings.torch_dtype)
    if is_compiled_variant(name):
        compile_moe_blocks(block)  # a PESC block (parse_variant refuses others)
    if name == REFERENCE:
        block = LoopPescBlock.from_pesc(block)
        forward = lambda x: block(x, ffn(x))  # noqa: E731
    return block, forward


def _block_variant(name: str, ffn: nn.Module, x0: torch.Tensor, grad_out: torch.Tensor,
                   settings: BenchSettings, dims: MoEDims, device: torch.device) -> Variant:
    x = x0.clone().requires_grad_(True)  # the block's input needs a gradient, as inside a model
    tokens, hidden = x.shape
    method, dispatch = parse_variant(name)
    if name == BASELINE:
        module, forward, path = None, ffn, "-"
    else:
        module, forward = make_block(settings, name, ffn, hidden, device)
        path = dispatch_label(module, dispatch, tokens, settings, hidden, device)
    trainable = [x] + ([p for p in module.parameters() if p.requires_grad] if module is not None else [])
    if module is not None:
        module.train()
    autocast = autocast_for(settings, device)

    def step() -> None:
        with autocast():
            y = forward(x)
        y.backward(grad_out.to(y.dtype))

    def reset() -> None:
        for p in trainable:
            p.grad = None

    return Variant(
        level="block", method=name, path=path, tokens=tokens,
        flops=block_flops(name, tokens, dims), flops_for_path=lambda label: block_flops(name, tokens, dims, label),
        step=step, reset=reset, extra={"module": module, "input": x},
        relabel=None if module is None else lambda: dispatch_label(module, dispatch, tokens, settings, hidden, device),
    )
