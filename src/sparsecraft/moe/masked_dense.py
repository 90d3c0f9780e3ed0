"""The masked-dense adapter kernel for training: every expert on every token, gated by a `[N, E]` mask, as one
autograd Function that keeps only the pre-activation for backward.

Composed from torch ops under autograd, the masked-dense path (`experts._dense`) saves the pre-activation, the
activation, the gated activation (each `[N, E*r]`) and the stacked `up` copy (`[E*r, h]`): 3.6 MiB per layer in
bf16 at the quickstart's shape (1,024 tokens, E=8, r=64, h=576), 7.2 MiB in fp32. This Function saves the
pre-activation and the mask (1.0 / 2.05 MiB) and recomputes the rest in backward (an activation and a copy of
`up`, small next to the six matmuls, which dominate either way): over 30 layers 77 / 154 MiB less at the peak of
a step, at about the same speed (docs/benchmarks.md).

Shapes: x `[N, h]`, gates `[N, k]` (scaling folded in, x's dtype), indices `[N, k]` (distinct per row), down
`[E, r, h]`, up `[E, h, r]`; output `[N, h]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .activations import activation_with_vjp
from .stacked import stack_up


def gate_mask(indices: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[N, E]` in gates' dtype: the gate of expert e for token n where token n chose it (`indices, gates: [N, k]`),
    0 elsewhere. Both forms of the masked-dense path build it this one way."""
    return gates.new_zeros(indices.shape[0], num_experts).scatter_add(1, indices, gates)


class MaskedDenseAdapters(torch.autograd.Function):
    """`out[n] = sum_e mask[n, e] * up[e] @ act(down[e] @ x[n])`, mask[n, e] = the gate of expert e if token n
    chose it, else 0. Gradients for x, gates, down and up."""

    @staticmethod
    def forward(ctx, x, gates, indices, down, up, act: Callable):
        num_tokens = x.shape[0]
        num_experts, adapter_dim, hidden = down.shape
        mask = gate_mask(indices, gates, num_experts)  # [N, E]
        pre = x @ down.view(num_experts * adapter_dim, hidden).t()  # [N, E*r]
        gated = act(pre).view(num_tokens, num_experts, adapter_dim).mul_(mask.unsqueeze(-1))
        ctx.save_for_backward(x, pre, mask, indices, down, up)
        ctx.act = act
        return gated.view(num_tokens, num_experts * adapter_dim) @ stack_up(up)

    @staticmethod
    @once_differentiable  # first derivatives only: a double backward raises instead of going wrong
    def backward(ctx, grad_out):
        x, pre, mask, indices, down, up = ctx.saved_tensors
        num_tokens = x.shape[0]
        num_experts, adapter_dim, hidden = down.shape
        grad_out = grad_out.contiguous()
        act_value, act_vjp = activation_with_vjp(ctx.act, pre)
        act_value = act_value.view(num_tokens, num_experts, adapter_dim)
        grad_gated = (grad_out @ stack_up(up).t()).view(num_tokens, num_experts, adapter_dim)
        grad_x = grad_gates = grad_down = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_gates = (grad_gated * act_value).sum(-1).gather(1, indices)  # [N, k]
        if ctx.needs_input_grad[4]:
            gated = (act_value * mask.unsqueeze(-1)).view(num_tokens, num_experts * adapter_dim)
            grad_up = (grad_out.t() @ gated).view(hidden, num_experts, adapter_dim).transpose(0, 1).contiguous()
        grad_pre = act_vjp(grad_gated.mul_(mask.unsqueeze(-1)).view(num_tokens, num_experts * adapter_dim))
        if ctx.needs_input_grad[3]:
            grad_down = (grad_pre.t() @ x).view(num_experts, adapter_dim, hidden)
        if ctx.needs_input_grad[0]:
            grad_x = grad_pre @ down.view(num_experts * adapter_dim, hidden)
        return grad_x, grad_gates, None, grad_down, grad_up, None


def masked_dense_adapters(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, down: torch.Tensor,
                          up: torch.Tensor, act: Callable) -> torch.Tensor:
    """Functional entry point of `MaskedDenseAdapters` (shapes in the module docstring)."""
    return MaskedDenseAdapters.apply(x, gates.to(x.dtype), indices.long(), down.contiguous(), up.contiguous(), act)
