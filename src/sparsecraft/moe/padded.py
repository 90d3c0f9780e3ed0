"""The padded adapter kernel: routed bottleneck adapters as batched matmuls over per-expert row blocks.

Each expert gets a block of `C` rows (`C` = the busiest expert's pair count, rounded up to `ROW_MULTIPLE`); a
(token, slot) pair is copied into its expert's block, and both projections, forward and backward, are one
`torch.bmm` each over `[E, C, .]` — the weight gradients included (`[E, r, C] x [E, C, h]`). Rows past an
expert's count are gathered like the others and then zeroed (and their gate is zero), so they add nothing to any
output or gradient — not even where a token's values or gradients are not finite — and are never read back.

Why beside `grouped.py`: on the CPU, torch's `_grouped_mm` and per-expert `mm` loops reach a fraction of what one
batched matmul does at adapter sizes (bf16 at the quickstart's shape, 1,024 pairs, h=576, r=64: `_grouped_mm`
297 us, a loop of 8 `mm` 333 us, `bmm` over 8 x 144 padded rows 79 us; docs/benchmarks.md), and its row counts
vary per call, so oneDNN generates new bf16 kernels for them, while the blocks' multiples of 16 repeat. The price
is the padding: `C * E` rows instead of `N * k`. A token picks an expert at most once, so `C` is at most N rounded
up to 16 and the padded FLOPs at most the masked-dense path's plus that rounding; when routing is so uneven that
`C * E > MAX_PADDING * N * k` (+ a tile per expert), the caller (`experts._padded`) takes the grouped kernel
instead, which keeps the temporaries bounded.

What is saved for backward: the adapter input `x [N, h]`, the pre-activation `[E, C, r]`, the padded gates, the
layout and the weights; the padded copy of `x` is gathered again in backward (cheap next to the matmuls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .activations import activation_with_vjp
from .grouped import ROW_MULTIPLE, gather_rows, place_gates, place_pairs, unsort_sum

MAX_PADDING = 2.0  # padded rows allowed per routed pair before the call goes to the grouped kernel


class PaddedLayout(NamedTuple):
    """Where the (token, slot) pairs sit in the flat `[E * C, .]` layout.

    rows `[N, k]`: pair `(n, j)`'s row (expert `indices[n, j]`'s block, in token order within it); source
    `[E * C]`: the token each row reads (0 for spare rows); spare `[S]`: the rows no pair uses; capacity: `C`.
    """

    rows: torch.Tensor
    source: torch.Tensor
    spare: torch.Tensor
    capacity: int


def padded_rows(indices: torch.Tensor, num_experts: int) -> PaddedLayout:
    """The padded layout of the (token, slot) pairs of `indices [N, k]` (expert indices, distinct per row)."""
    rows, source, spare, _ = place_pairs(indices, num_experts, ROW_MULTIPLE, uniform=True)
    return PaddedLayout(rows, source, spare, source.numel() // num_experts if num_experts else 0)


def gather_blocks(values: torch.Tensor, layout: PaddedLayout, num_experts: int) -> torch.Tensor:
    """`[N, d]` -> `[E, C, d]`: each row's token's values, spare rows zero."""
    out = gather_rows(values, layout.source, layout.spare)
    return out.view(num_experts, layout.capacity, values.shape[-1])


def gather_sum(padded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`[E * C, d]` -> `[N, d]`: the sum over each token's k rows (`grouped.unsort_sum` with the padded rows)."""
    return unsort_sum(padded, rows.reshape(-1), *rows.shape)


class PaddedAdapters(torch.autograd.Function):
    """`out[n] = sum_j gates[n, j] * up[e] @ act(down[e] @ x[n])`, e = indices[n, j], as batched matmuls.

    Shapes: x `[N, h]`, gates `[N, k]` (scaling folded in, x's dtype), rows `[N, k]`, source `[E * C]` and spare
    `[S]` (a `PaddedLayout`), down `[E, r, h]`, up `[E, h, r]`; returns `[N, h]`. Gradients for x, gates, down
    and up.
    """

    @staticmethod
    def forward(ctx, x, gates, rows, source, spare, down, up, act: Callable):
        num_experts, adapter_dim, hidden = down.shape
        total = source.numel()
        layout = PaddedLayout(rows, source, spare, total // num_experts)
        xp = gather_blocks(x, layout, num_experts)
        gate = place_gates(gates, rows, total).view(num_experts, layout.capacity, 1)
        pre = torch.bmm(xp, down.transpose(1, 2))  # [E, C, r]
        ys = torch.bmm(act(pre) * gate, up.transpose(1, 2))  # [E, C, h]
        ctx.save_for_backward(x, rows, source, spare, pre, gate, down, up)
        ctx.act = act
        return gather_sum(ys.view(total, hidden), rows)

    @staticmethod
    @once_differentiable  # first derivatives only: a double backward raises instead of going wrong
    def backward(ctx, grad_out):
        x, rows, source, spare, pre, gate, down, up = ctx.saved_tensors
        num_experts, adapter_dim, hidden = down.shape
        total = source.numel()
        layout = PaddedLayout(rows, source, spare, total // num_experts)
        grad_ys = gather_blocks(grad_out.contiguous(), layout, num_experts)  # [E, C, h]
        act_value, act_vjp = activation_with_vjp(ctx.act, pre)
        grad_x = grad_gates = grad_down = grad_up = None
        grad_ag = torch.bmm(grad_ys, up)  # d(act * gate): [E, C, h] x [E, h, r]
        if ctx.needs_input_grad[6]:
            grad_up = torch.bmm(grad_ys.transpose(1, 2), act_value * gate)  # [E, h, C] x [E, C, r]
        if ctx.needs_input_grad[1]:
            grad_gate_rows = (grad_ag * act_value).sum(-1).reshape(total)
            grad_gates = grad_gate_rows.index_select(0, rows.reshape(-1)).view(rows.shape)
        grad_pre = act_vjp(grad_ag * gate)
        if ctx.needs_input_grad[5]:
            grad_down = torch.bmm(grad_pre.transpose(1, 2), gather_blocks(x, layout, num_experts))  # [E, r, h]
        if ctx.needs_input_grad[0]:
            grad_xp = torch.bmm(grad_pre, down)  # [E, C, r] x [E, r, h]
            grad_x = gather_sum(grad_xp.view(total, hidden), rows)
        return grad_x, grad_gates, None, None, None, grad_down, grad_up, None


def padding_pays(capacity: int, num_experts: int, num_pairs: int) -> bool:
    """Whether `num_experts` blocks of `capacity` rows stay within `MAX_PADDING` rows per routed pair (plus one
    tile per expert); beyond that the caller takes the grouped kernel."""
    return capacity * num_experts <= MAX_PADDING * num_pairs + ROW_MULTIPLE * num_experts


def padded_adapters(x: torch.Tensor, gates: torch.Tensor, layout: PaddedLayout, down: torch.Tensor,
                    up: torch.Tensor, act: Callable) -> torch.Tensor:
    """Functional entry point of `PaddedAdapters` (shapes in its docstring; `layout` from `padded_rows`)."""
    if layout.rows.shape[0] == 0:
        return x.new_zeros(x.shape)
    return PaddedAdapters.apply(x, gates.to(x.dtype), layout.rows, layout.source, layout.spare, down.contiguous(),
                                up.contiguous(), act)
