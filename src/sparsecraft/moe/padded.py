"""The padded adapter kernel: routed bottleneck adapters as batched matmuls over per-expert row blocks.

Each expert gets a block of `C` rows (`C` = the busiest expert's pair count, rounded up to `ROW_MULTIPLE`); a
(token, slot) pair is copied into its expert's block, and both projections, forward and backward, are one
`torch.bmm` each over `[E, C, .]` — the weight gradients included (`[E, r, C] x [E, C, h]`). Rows past an
expert's count copy token 0 (a gather needs no zero-filled buffer) with a zero gate, so they add nothing to any
output or gradient, and they are never read back.

Why beside `grouped.py`: on the CPU, torch's `_grouped_mm` and per-expert `mm` loops reach a fraction of what one
batched matmul does at adapter sizes (bf16 at the quickstart's shape, 1,024 pairs, h=576, r=64: `_grouped_mm`
297 us, a loop of 8 `mm` 333 us, `bmm` over 8 x 140 padded rows 86 us; docs/benchmarks.md). The price is the
padding: `C * E` rows instead of `N * k`. Since a token picks an expert at most once, `C <= N`, so the padded
FLOPs never exceed the masked-dense path's; when routing is so uneven that `C * E > MAX_PADDING * N * k`, the
caller (`experts._padded`) takes the grouped kernel instead, which keeps the temporaries bounded.

What is saved for backward: the adapter input `x [N, h]`, the pre-activation `[E, C, r]`, the padded gates and
the layout; the padded copy of `x` is gathered again in backward (cheap next to the matmuls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ROW_MULTIPLE = 16  # AMX / tensor-core tiles take 16 rows
MAX_PADDING = 2.0  # padded rows allowed per routed pair before the call goes to the grouped kernel


def padded_rows(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The padded layout of the (token, slot) pairs.

    Args:
        indices: `[N, k]` expert indices (int64, distinct within a row).

    Returns:
        `rows [N, k]`: pair `(n, j)`'s row in the flat `[E * C, .]` layout (expert `indices[n, j]`'s block, in
        token order within it); `source [E * C]`: the token each row reads (0 for padding rows, whose gate is
        zero); and `C`.
    """
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat, num_experts)  # [N*k, E]
    running = one_hot.cumsum(0)  # pairs of each expert so far, in token order
    counts = running[-1] if flat.numel() else one_hot.sum(0)
    capacity = -(-int(counts.max()) // ROW_MULTIPLE) * ROW_MULTIPLE if flat.numel() else 0
    rank = running.gather(1, flat.unsqueeze(1)).squeeze(1) - 1
    rows = flat * capacity + rank
    source = torch.zeros(num_experts * capacity, dtype=torch.long, device=flat.device)
    source[rows] = torch.arange(num_tokens, device=flat.device).repeat_interleave(top_k)
    return rows.view(num_tokens, top_k), source, capacity


def gather_sum(padded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`[E * C, d]` -> `[N, d]`: the sum over each token's k rows (one gather per slot, added in place)."""
    out = padded.index_select(0, rows[:, 0])
    for j in range(1, rows.shape[1]):
        out.add_(padded.index_select(0, rows[:, j]))
    return out


class PaddedAdapters(torch.autograd.Function):
    """`out[n] = sum_j gates[n, j] * up[e] @ act(down[e] @ x[n])`, e = indices[n, j], as batched matmuls.

    Shapes: x `[N, h]`, gates `[N, k]` (scaling folded in, x's dtype), indices `[N, k]` int64, down `[E, r, h]`,
    up `[E, h, r]`; returns `[N, h]`. Gradients for x, gates, down and up.
    """

    @staticmethod
    def forward(ctx, x, gates, rows, source, down, up, act: Callable):
        num_experts, adapter_dim, hidden = down.shape
        total = source.numel()
        capacity = total // num_experts
        xp = x.index_select(0, source).view(num_experts, capacity, hidden)
        gate = x.new_zeros(total).index_put_((rows.reshape(-1),), gates.reshape(-1)).view(num_experts, capacity, 1)
        pre = torch.bmm(xp, down.transpose(1, 2))  # [E, C, r]
        ys = torch.bmm(act(pre) * gate, up.transpose(1, 2))  # [E, C, h]
        ctx.save_for_backward(x, rows, source, pre, gate, down, up)
        ctx.act = act
        return gather_sum(ys.view(total, hidden), rows)

    @staticmethod
    def backward(ctx, grad_out):
        x, rows, source, pre, gate, down, up = ctx.saved_tensors
        num_experts, adapter_dim, hidden = down.shape
        total = source.numel()
        capacity = total // num_experts
        # padding rows read token 0's gradient: finite, and multiplied by their zero gate wherever it counts
        grad_ys = grad_out.contiguous().index_select(0, source).view(num_experts, capacity, hidden)
        with torch.enable_grad():
            pre_ = pre.detach().requires_grad_(True)
            activated = ctx.act(pre_)
        act_value = activated.detach()
        grad_x = grad_gates = grad_down = grad_up = None
        grad_ag = torch.bmm(grad_ys, up)  # d(act * gate): [E, C, h] x [E, h, r]
        if ctx.needs_input_grad[5]:
            grad_up = torch.bmm(grad_ys.transpose(1, 2), act_value * gate)  # [E, h, C] x [E, C, r]
        if ctx.needs_input_grad[1]:
            grad_gate_rows = (grad_ag * act_value).sum(-1).reshape(total)
            grad_gates = grad_gate_rows.index_select(0, rows.reshape(-1)).view(rows.shape)
        (grad_pre,) = torch.autograd.grad(activated, pre_, grad_ag * gate)
        if ctx.needs_input_grad[4]:
            xp = x.index_select(0, source).view(num_experts, capacity, hidden)
            grad_down = torch.bmm(grad_pre.transpose(1, 2), xp)  # [E, r, C] x [E, C, h]
        if ctx.needs_input_grad[0]:
            grad_xp = torch.bmm(grad_pre, down)  # [E, C, r] x [E, r, h]
            grad_x = gather_sum(grad_xp.view(total, hidden), rows)
        return grad_x, grad_gates, None, None, grad_down, grad_up, None


def padding_pays(capacity: int, num_experts: int, num_pairs: int) -> bool:
    """Whether `num_experts` blocks of `capacity` rows stay within `MAX_PADDING` rows per routed pair (plus one
    tile per expert); beyond that the caller takes the grouped kernel."""
    return capacity * num_experts <= MAX_PADDING * num_pairs + ROW_MULTIPLE * num_experts


def padded_adapters(x: torch.Tensor, gates: torch.Tensor, rows: torch.Tensor, source: torch.Tensor,
                    down: torch.Tensor, up: torch.Tensor, act: Callable) -> torch.Tensor:
    """Functional entry point of `PaddedAdapters` (shapes in its docstring; `rows` and `source` from
    `padded_rows`)."""
    if rows.shape[0] == 0:
        return x.new_zeros(x.shape)
    return PaddedAdapters.apply(x, gates, rows, source, down.contiguous(), up.contiguous(), act)
