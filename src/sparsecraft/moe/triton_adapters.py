"""Routed adapters as Triton kernels, in the ScatterMoE manner (dispatch path `triton`; GPUs).

One kernel, `_grouped_rows_kernel`, computes `OUT[out_row(p)] = epilogue(prologue(A[in_row(p)]) @ W[e]^T)` for
the N*k (token, slot) pairs p sorted by expert, in row blocks that never straddle two experts:

- forward, down-projection: A = x read *through the pair's token index* (gather inside the matmul: no `[N*k, h]`
  copy of x), W = down `[E, r, h]`, giving the pre-activation `[N*k, r]` in sorted order;
- forward, up-projection: A = that pre-activation with GELU applied as it is loaded, W = up `[E, h, r]`, the gate
  multiplied in the epilogue, and each row stored straight at its pair's own position (`n*k + j`), so the sum
  over a token's k slots is a view and a `sum` — no scatter-add, no sorted `[N*k, h]` copy to unsort;
- backward: the same kernel gives the gradient through `up` (A = the output gradient, gathered by token) and the
  adapter input's gradient (A = the pre-activation gradient, stored at pair positions); weight gradients are
  per-expert matmuls (`grouped.weight_grad`).

`grouped.GroupedAdapters` (torch ops) is the reference it is tested against; on a CPU the test runs the kernel
in Triton's interpreter (`TRITON_INTERPRET=1`), on CUDA compiled. Only the exact GELU is fused; other
activations use the other paths.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

from .activations import activation_with_vjp
from .grouped import sort_pairs, weight_grad

BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 32


def triton_available(x: torch.Tensor, activation: str) -> bool:
    """Whether the `triton` path can run this call: Triton installed, exact GELU, and a CUDA tensor (or a CPU
    one under Triton's interpreter)."""
    if activation != "gelu" or not _triton_installed():
        return False
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (importing triton is slow, and only this path needs it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _grouped_rows_kernel(A, W, OUT, in_rows, out_rows, gates, block_expert, block_start, block_end,
                             K, NOUT, stride_am, stride_we, stride_wn, stride_wk, stride_om,
                             GATHER: tl.constexpr, SCATTER: tl.constexpr, GELU: tl.constexpr, GATE: tl.constexpr,
                             PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        block = tl.program_id(0)
        expert = tl.load(block_expert + block)
        start = tl.load(block_start + block)
        end = tl.load(block_end + block)  # an unused block has start == end: every row masked off
        p = start + tl.arange(0, BM)
        row_ok = p < end
        if GATHER:
            rows = tl.load(in_rows + p, mask=row_ok, other=0)
        else:
            rows = p
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < NOUT
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < K
            a = tl.load(A + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if GELU:  # exact GELU on the loaded pre-activation, in fp32
                af = a.to(tl.float32)
                a = (0.5 * af * (1.0 + tl.math.erf(af * 0.7071067811865476))).to(a.dtype)
            w = tl.load(W + expert * stride_we + n[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATE:
            acc = acc * tl.load(gates + p, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if SCATTER:
            dest = tl.load(out_rows + p, mask=row_ok, other=0)
        else:
            dest = p
        tl.store(OUT + dest[:, None] * stride_om + n[None, :], acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])

    return _grouped_rows_kernel


def block_table(offs: torch.Tensor, num_rows: int, block_m: int = BLOCK_M) -> tuple[torch.Tensor, ...]:
    """Row blocks of the expert-sorted pairs, each inside one expert: `(expert, start, end)`, int32 `[B]` each.

    `offs` `[E]` are the cumulative expert counts. B = ceil(rows / block_m) + E bounds the real count without
    reading it to the host; the spare blocks have start == end (nothing to do).
    """
    num_experts = offs.numel()
    ends = offs.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    blocks = (ends - starts + block_m - 1) // block_m  # [E]
    last_block = torch.cumsum(blocks, 0)  # block index one past each expert's last
    b = torch.arange(-(-num_rows // block_m) + num_experts, device=offs.device)
    expert = torch.searchsorted(last_block, b, right=True)
    used = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    start = starts[expert] + (b - (last_block[expert] - blocks[expert])) * block_m
    end = torch.minimum(start + block_m, ends[expert])
    zero = torch.zeros_like(start)
    return (expert.int(), torch.where(used, start, zero).int(), torch.where(used, end, zero).int())


def grouped_rows(a: torch.Tensor, w: torch.Tensor, table: tuple[torch.Tensor, ...], num_rows: int, *,
                 in_rows: torch.Tensor | None = None, out_rows: torch.Tensor | None = None,
                 gates: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """`OUT[out_rows[p]] = gates[p] * act(a[in_rows[p]]) @ w[e(p)]^T` for the sorted pairs p (a launch of the
    kernel). `a` `[M, K]`, `w` `[E, NOUT, K]` (any strides), result `[num_rows, NOUT]` in `a`'s dtype;
    `in_rows` / `out_rows` default to p itself, `gates` `[num_rows]` to 1, `act` to the identity."""
    a = a.contiguous()
    num_out, k_dim = w.shape[1], w.shape[2]
    out = a.new_empty(num_rows, num_out)
    if num_rows == 0:
        return out
    expert, start, end = table
    dummy = start  # an unused pointer argument (its constexpr flag is off)
    grid = (expert.numel(), -(-num_out // BLOCK_N))
    _kernel()[grid](
        a, w, out, in_rows if in_rows is not None else dummy, out_rows if out_rows is not None else dummy,
        gates if gates is not None else dummy, expert, start, end, k_dim, num_out, a.stride(0), w.stride(0),
        w.stride(1), w.stride(2), out.stride(0), GATHER=in_rows is not None, SCATTER=out_rows is not None,
        GELU=gelu, GATE=gates is not None, PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return out


class TritonAdapters(torch.autograd.Function):
    """`out[n] = sum_j gates[n, j] * up[e] @ gelu(down[e] @ x[n])`, e = indices[n, j], through the kernel.

    Shapes: x `[N, h]`, gates `[N, k]`, indices `[N, k]` int64, down `[E, r, h]`, up `[E, h, r]`; returns
    `[N, h]`. Gradients for x, gates, down and up (as `grouped.GroupedAdapters`)."""

    @staticmethod
    def forward(ctx, x, gates, indices, down, up):
        num_tokens, k = indices.shape
        order, inverse, offs = sort_pairs(indices, down.shape[0])
        token = torch.div(order, k, rounding_mode="floor")
        gate = gates.reshape(-1).index_select(0, order).contiguous()  # [N*k], sorted
        table = block_table(offs, order.numel())
        pre = grouped_rows(x, down, table, order.numel(), in_rows=token)  # [N*k, r], sorted
        ys = grouped_rows(pre, up, table, order.numel(), out_rows=order, gates=gate, gelu=True)  # pair order
        ctx.save_for_backward(x, pre, gate, order, inverse, offs, token, down, up, *table)
        ctx.k = k
        return ys.view(num_tokens, k, -1).sum(1)

    @staticmethod
    @once_differentiable  # first derivatives only: a double backward raises instead of going wrong
    def backward(ctx, grad_out):
        x, pre, gate, order, inverse, offs, token, down, up, *table = ctx.saved_tensors
        num_tokens, k, rows = x.shape[0], ctx.k, order.numel()
        grad_out = grad_out.contiguous()
        # d(gate * act) = grad_ys @ up[e]: the output gradient gathered by token inside the kernel; up[e]^T as W
        grad_ag = grouped_rows(grad_out, up.transpose(1, 2), table, rows, in_rows=token)  # [N*k, r]
        act_value, act_vjp = activation_with_vjp(torch.nn.functional.gelu, pre)
        grad_x = grad_gates = grad_down = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_gates = (grad_ag * act_value).sum(-1).index_select(0, inverse).view(num_tokens, k)
        grad_pre = act_vjp(grad_ag * gate.unsqueeze(-1))
        if ctx.needs_input_grad[4]:
            grad_up = weight_grad(grad_out.index_select(0, token), act_value * gate.unsqueeze(-1), offs)
        if ctx.needs_input_grad[3]:
            grad_down = weight_grad(grad_pre, x.index_select(0, token), offs)  # [E, r, h]
        if ctx.needs_input_grad[0]:
            # grad_pre[p] @ down[e] stored at the pair's position, then summed over the k slots
            grad_xs = grouped_rows(grad_pre, down.transpose(1, 2), table, rows, out_rows=order)
            grad_x = grad_xs.view(num_tokens, k, -1).sum(1)
        return grad_x, grad_gates, None, grad_down, grad_up


def triton_adapters(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, down: torch.Tensor,
                    up: torch.Tensor) -> torch.Tensor:
    """Functional entry point of `TritonAdapters` (shapes in its docstring)."""
    return TritonAdapters.apply(x, gates.to(x.dtype), indices, down, up)
