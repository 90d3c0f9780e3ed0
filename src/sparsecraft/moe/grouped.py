"""The grouped adapter kernel: routed bottleneck adapters as one autograd Function over `torch._grouped_mm`.

Compared with composing `index_select` / `_grouped_mm` / `index_add` under autograd, it

- never scatters: (token, slot) pairs are sorted by expert once; outputs go back to token order with a gather
  through the inverse permutation and a sum over the k slots (`index_add`'s CPU kernel is a slow scatter);
- saves only the adapter input `x [N, h]` and the bottleneck pre-activation `[N*k, r]` for backward; the sorted
  copy of `x` (`[N*k, h]`) and the activation are recomputed, since they are cheap next to the matmuls;
- applies the gate between the two projections (`[N*k, r]` multiplies instead of `[N*k, h]`);
- in bf16 / fp16 on the CPU, starts every expert's group at a multiple of `ROW_MULTIPLE` rows, padded with zero rows
  (`place_pairs`; large groups to a 32nd of their power of two, `group_rows`): oneDNN generates a kernel for every
  matmul shape it has not seen (2.7 ms against 66 us for a known one), and a router's per-expert counts change with
  every batch, so exact-size groups paid that on nearly every call (36.8 ms per layer, forward and backward, at the
  quickstart's shape with changing routing, against 8.7 ms with groups of whole tiles; docs/benchmarks.md). fp32
  runs MKL, which has no such cost, so its groups stay exact.

`experts._sorted` (a loop over expert slices under plain autograd) is the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .activations import activation_with_vjp

ROW_MULTIPLE = 16  # AMX / tensor-core tiles take 16 rows


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


class PairLayout(NamedTuple):
    """Where the N*k (token, slot) pairs sit in a `[R, .]` layout grouped by expert (R >= N*k).

    rows `[N, k]`: pair `(n, j)`'s row; source `[R]`: the token each row reads (0 for a spare row); spare `[S]`:
    the rows no pair uses (zeroed after every gather); offs `[E]` int32: where each expert's rows end.
    """

    rows: torch.Tensor
    source: torch.Tensor
    spare: torch.Tensor
    offs: torch.Tensor


def place_pairs(indices: torch.Tensor, num_experts: int, multiple: int = 1, uniform: bool = False) -> PairLayout:
    """Lay out the (token, slot) pairs of `indices [N, k]` (expert indices, distinct per row) by expert, token
    order kept within an expert.

    Each expert's group holds its pair count rounded up to `multiple` rows, or with `uniform` the busiest
    expert's count rounded up (equal blocks, `padded.py`). `multiple=1` without `uniform` is the exact layout:
    no spare rows and no data-dependent sizes (it traces under torch.compile).
    """
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1).long()
    order, inverse, offs = sort_pairs(flat.view(num_tokens, top_k), num_experts)
    if multiple == 1 and not uniform:
        return PairLayout(inverse.view(num_tokens, top_k), torch.div(order, top_k, rounding_mode="floor"),
                          flat.new_empty(0), offs)
    ends = offs.long()
    counts = ends.diff(prepend=ends.new_zeros(1))
    if uniform:
        busiest = int(counts.max()) if flat.numel() else 0
        sizes = torch.full_like(counts, -(-busiest // multiple) * multiple)
    else:
        sizes = group_rows(counts, multiple)
    row_ends = sizes.cumsum(0)
    shift = (row_ends - sizes) - (ends - counts)  # where an expert's rows start, less where its pairs start
    rows = inverse + shift.index_select(0, flat)
    total = int(row_ends[-1]) if num_experts else 0
    source = flat.new_zeros(total).index_put_((rows,), torch.arange(num_tokens, device=flat.device)
                                               .repeat_interleave(top_k))
    used = torch.zeros(total, dtype=torch.bool, device=flat.device).index_fill_(0, rows, True)
    spare = (~used).nonzero().squeeze(1)
    return PairLayout(rows.view(num_tokens, top_k), source, spare, row_ends.to(torch.int32))


def group_rows(counts: torch.Tensor, multiple: int) -> torch.Tensor:
    """Rows given to groups of `counts` pairs: rounded up to `multiple`, and above 32 * multiple to a 32nd of the
    count's power of two (1,000 -> 1,008, 1,100 -> 1,120), so that however large the batch a group takes one of
    32 sizes per octave and at most 1/32 more rows than its pairs (+ a tile): oneDNN keeps a bounded number of
    kernels (1,024 by default), and whole tiles alone would let a large batch ask for thousands of sizes."""
    octave = torch.log2(counts.clamp(min=1).double()).floor().long()
    step = torch.pow(2, octave - 5).clamp(min=multiple)
    return torch.div(counts + step - 1, step, rounding_mode="floor") * step


def row_multiple(dtype: torch.dtype, device: torch.device) -> int:
    """Rows per group step for matmuls in `dtype` on `device`: whole tiles where oneDNN builds a kernel per shape
    (bf16 / fp16 on the CPU), exact counts elsewhere and under torch.compile (whose graphs want sizes that do not
    depend on the routing)."""
    if torch.compiler.is_compiling():
        return 1
    return ROW_MULTIPLE if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


def gather_rows(values: torch.Tensor, source: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    """`[N, d]` -> `[R, d]`: each row's token's values, spare rows zero."""
    out = values.index_select(0, source)
    return out.index_fill_(0, spare, 0) if spare.numel() else out


def place_gates(gates: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """`[N, k]` gates -> `[R]` in gates' dtype: each pair's gate at its row (`rows [N, k]`), zero on spare rows."""
    return gates.new_zeros(num_rows).index_put_((rows.reshape(-1),), gates.reshape(-1))


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

    Shapes: x `[N, h]`, gates `[N, k]` (scaling already folded in, x's dtype), rows `[N, k]`, source `[R]`,
    spare `[S]` and offs `[E]` (a `PairLayout`), down `[E, r, h]`, up `[E, h, r]`; returns `[N, h]`. Gradients
    for x, gates, down and up. Spare rows read zeros and have a zero gate, so they add nothing anywhere.
    """

    @staticmethod
    def forward(ctx, x, gates, rows, source, spare, offs, down, up, act: Callable):
        num_tokens, k = rows.shape
        flat_rows = rows.reshape(-1)
        gate = place_gates(gates, rows, source.numel()).unsqueeze(-1)  # [R, 1]
        xs = gather_rows(x, source, spare)
        pre = torch._grouped_mm(xs, down.transpose(1, 2), offs=offs)  # [R, r]
        ys = torch._grouped_mm(act(pre) * gate, up.transpose(1, 2), offs=offs)  # [R, h]
        ctx.save_for_backward(x, rows, source, spare, offs, pre, gate, down, up)
        ctx.act = act
        return unsort_sum(ys, flat_rows, num_tokens, k)

    @staticmethod
    @once_differentiable  # first derivatives only: a double backward raises instead of going wrong
    def backward(ctx, grad_out):
        x, rows, source, spare, offs, pre, gate, down, up = ctx.saved_tensors
        num_tokens, k = rows.shape
        grad_ys = gather_rows(grad_out.contiguous(), source, spare)  # d out / d ys is a gather: [R, h]
        act_value, act_vjp = activation_with_vjp(ctx.act, pre)
        grad_x = grad_gates = grad_down = grad_up = None
        # through up: d(act*gate) = grad_ys @ up[e]  ([R, h] x [h, r])
        grad_ag = torch._grouped_mm(grad_ys, up, offs=offs)
        if ctx.needs_input_grad[7]:
            # up[e] grad = grad_ys_e^T @ (act*gate)_e  -> [E, h, r]
            grad_up = weight_grad(grad_ys, act_value * gate, offs)
        if ctx.needs_input_grad[1]:
            grad_gate_rows = (grad_ag * act_value).sum(-1)  # [R]
            grad_gates = grad_gate_rows.index_select(0, rows.reshape(-1)).view(num_tokens, k)
        grad_pre = act_vjp(grad_ag * gate)
        if ctx.needs_input_grad[6]:
            xs = gather_rows(x, source, spare)  # recomputed rather than saved: a gather, cheap next to a matmul
            grad_down = weight_grad(grad_pre, xs, offs)  # [E, r, h]
        if ctx.needs_input_grad[0]:
            grad_xs = torch._grouped_mm(grad_pre, down, offs=offs)  # [R, r] x [r, h]
            grad_x = unsort_sum(grad_xs, rows.reshape(-1), num_tokens, k)
        return grad_x, grad_gates, None, None, None, None, grad_down, grad_up, None


def grouped_adapters(
    x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, down: torch.Tensor, up: torch.Tensor, act: Callable
) -> torch.Tensor:
    """Functional entry point of `GroupedAdapters` (see its docstring for shapes; `indices [N, k]`)."""
    layout = place_pairs(indices, down.shape[0], row_multiple(x.dtype, x.device))
    return GroupedAdapters.apply(x, gates.to(x.dtype), *layout, down.contiguous(), up.contiguous(), act)
