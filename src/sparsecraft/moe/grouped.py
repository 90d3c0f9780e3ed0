"""The grouped adapter kernel: routed bottleneck adapters as one autograd Function over `torch._grouped_mm`.

Compared with composing `index_select` / `_grouped_mm` / `index_add` under autograd, it

- never scatters: (token, slot) pairs are sorted by expert once; outputs go back to token order with a gather
  through the inverse permutation and a sum over the k slots (`index_add`'s CPU kernel is a slow scatter);
- saves only the adapter input `x [N, h]` and the bottleneck pre-activation `[N*k, r]` for backward; the sorted
  copy of `x` (`[N*k, h]`) and the activation are recomputed, since they are cheap next to the matmuls;
- applies the gate between the two projections (`[N*k, r]` multiplies instead of `[N*k, h]`).

`experts._sorted` (a loop over expert slices under plain autograd) is the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .activations import activation_with_vjp


def sort_pairs(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N*k (token, slot) pairs by expert.

    Returns `order [N*k]` (sorted position -> flat pair index `n*k + j`), its inverse `[N*k]` and the int32
    cumulative expert counts `offs [E]` that `_grouped_mm` takes.
    """
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    offs = torch.cumsum(torch.bincount(flat, minlength=num_experts), 0, dtype=torch.int32)
    return order, inverse, offs


def unsort_sum(sorted_rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """`[N*k, d]` rows in expert order -> `[N, d]` sums over each token's k slots.

    One gather per slot added in place, rather than one `[N*k, d]` gather and `sum(1)`: torch's reduction over a
    dimension of 2 is slow on the CPU (at N=1024, d=576: 720 vs 188 us in bf16, 460 vs 274 us in fp32)."""
    slots = inverse.view(num_tokens, k)
    out = sorted_rows.index_select(0, slots[:, 0])
    for j in range(1, k):
        out.add_(sorted_rows.index_select(0, slots[:, j]))
    return out


def cuda_grouped_mm_runs(t: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs for CUDA tensors like `t`: bf16 on sm90+ in current torch releases."""
    return t.device.type == "cuda" and t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)[0] >= 9


def weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert `a_e^T @ b_e` for row groups ending at `offs`: `[N*k, m], [N*k, n] -> [E, m, n]`.

    The grouped kernel where it runs well (CUDA, bf16, sm90+); elsewhere one `mm` per expert written into one
    preallocated tensor — on the CPU, torch 2.13's `_grouped_mm` for this (2-D x 2-D, groups along the reduced
    dimension) runs at half the speed of that loop (25 ms vs 13 ms at LLaMA-2-7B shapes).
    """
    if cuda_grouped_mm_runs(a):
        return torch._grouped_mm(a.t(), b, offs=offs)
    out = a.new_empty(offs.numel(), a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[e])
        else:
            out[e].zero_()
        start = end
    return out


class GroupedAdapters(torch.autograd.Function):
    """`out[n] = sum_j gates[n, j] * up[e] @ act(down[e] @ x[n])`, e = indices[n, j], for all n at once.

    Shapes: x `[N, h]`, gates `[N, k]` (scaling already folded in), indices `[N, k]` int64, down `[E, r, h]`,
    up `[E, h, r]`; returns `[N, h]`. Gradients for x, gates, down and up.
    """

    @staticmethod
    def forward(ctx, x, gates, indices, down, up, act: Callable):
        num_tokens, k = indices.shape
        order, inverse, offs = sort_pairs(indices, down.shape[0])
        token = torch.div(order, k, rounding_mode="floor")
        gate = gates.reshape(-1).index_select(0, order).unsqueeze(-1)  # [N*k, 1]
        xs = x.index_select(0, token)
        pre = torch._grouped_mm(xs, down.transpose(1, 2), offs=offs)  # [N*k, r]
        ys = torch._grouped_mm(act(pre) * gate, up.transpose(1, 2), offs=offs)  # [N*k, h]
        ctx.save_for_backward(x, pre, gate, order, inverse, offs, down, up)
        ctx.act, ctx.k = act, k
        return unsort_sum(ys, inverse, num_tokens, k)

    @staticmethod
    def backward(ctx, grad_out):
        x, pre, gate, order, inverse, offs, down, up = ctx.saved_tensors
        num_tokens, k = x.shape[0], ctx.k
        token = torch.div(order, k, rounding_mode="floor")
        grad_ys = grad_out.contiguous().index_select(0, token)  # d out / d ys is a gather: [N*k, h]
        act_value, act_vjp = activation_with_vjp(ctx.act, pre)
        grad_x = grad_gates = grad_down = grad_up = None
        # through up: d(act*gate) = grad_ys @ up[e]  ([N*k, h] x [h, r])
        grad_ag = torch._grouped_mm(grad_ys, up, offs=offs)
        if ctx.needs_input_grad[4]:
            # up[e] grad = grad_ys_e^T @ (act*gate)_e  -> [E, h, r]
            grad_up = weight_grad(grad_ys, act_value * gate, offs)
        if ctx.needs_input_grad[1]:
            grad_gate_sorted = (grad_ag * act_value).sum(-1)  # [N*k]
            grad_gates = grad_gate_sorted.index_select(0, inverse).view(num_tokens, k)
        grad_pre = act_vjp(grad_ag * gate)
        if ctx.needs_input_grad[3]:
            xs = x.index_select(0, token)  # recomputed rather than saved: a gather, cheap next to a matmul
            grad_down = weight_grad(grad_pre, xs, offs)  # [E, r, h]
        if ctx.needs_input_grad[0]:
            grad_xs = torch._grouped_mm(grad_pre, down, offs=offs)  # [N*k, r] x [r, h]
            grad_x = unsort_sum(grad_xs, inverse, num_tokens, k)
        return grad_x, grad_gates, None, grad_down, grad_up, None


def grouped_adapters(
    x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, down: torch.Tensor, up: torch.Tensor, act: Callable
) -> torch.Tensor:
    """Functional entry point of `GroupedAdapters` (see its docstring for shapes)."""
    return GroupedAdapters.apply(x, gates, indices, down.contiguous(), up.contiguous(), act)
