"""Router auxiliary losses, in fp32, over non-padding tokens only.

Unlike the published PESC code (whose "aux loss" averaged top-k gates and was the constant E), the load-balancing
loss here uses the full-softmax probabilities `P_i`, so it has a gradient with respect to the router.
"""

from __future__ import annotations

import torch


def _valid(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask.to(device=t.device, dtype=torch.bool)]


def _global_sum(t: torch.Tensor, sync: bool) -> torch.Tensor:
    """Sum over processes when `sync` and torch.distributed is up (no gradient flows through it)."""
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.detach().clone()
        torch.distributed.all_reduce(t)
    return t


def _world(sync: bool) -> int:
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def load_balancing_loss(
    logits: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    sync: bool = False,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer loss `E * sum_i f_i * P_i` (without the coefficient alpha).

    Args:
        logits: router logits `[N, E]`.
        indices: chosen experts `[N, k]`.
        mask: bool `[N]`, True for real (non-padding) tokens; None means all tokens count.
        sync: compute `f_i` and the token count over all processes (every rank must call it), and scale so that
            DDP's gradient averaging yields exactly the gradient of the loss over the global batch.
        seen: `[E + 1]` expert counts and tokens to form `f_i` from instead of this call's (global balance: the
            optimizer step's micro-batches so far, this one included; see `balance_counts`); `P_i` stays this
            call's.

    Returns:
        A scalar fp32 tensor; 1.0 for perfectly uniform routing, up to E when all tokens go to one expert.
        `f_i` is the fraction of (token, slot) assignments to expert i and carries no gradient; `P_i`, the mean
        router probability of expert i, carries the gradient.
    """
    logits = _valid(logits.float(), mask)
    indices = _valid(indices, mask)
    probs = torch.softmax(logits, dim=-1)
    stats = _global_sum(_count_vector(indices, num_experts, logits.shape[0]).to(probs.dtype), sync)
    num_tokens = stats[-1]
    if num_tokens == 0:
        return logits.sum() * 0.0
    seen = stats if seen is None else seen.to(stats)
    fraction = seen[:-1] / (seen[-1] * indices.shape[-1])
    mean_prob = probs.sum(dim=0) / num_tokens * _world(sync)
    return num_experts * torch.sum(fraction * mean_prob)


def _count_vector(indices: torch.Tensor, num_experts: int, num_tokens: int) -> torch.Tensor:
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).double()
    return torch.cat([counts, counts.new_tensor([num_tokens])])


def balance_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None,
                   sync: bool = False, prior: torch.Tensor | None = None) -> torch.Tensor:
    """`[E + 1]` float64: (token, slot) counts per expert and the token count over real tokens (all processes
    with `sync`), plus `prior` (the same vector for earlier micro-batches of the step)."""
    indices = _valid(indices, mask)
    stats = _global_sum(_count_vector(indices, num_experts, indices.shape[0]), sync)
    return stats if prior is None else stats + prior.to(stats)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None, sync: bool = False) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`. `logits: [N, E]`, `mask: [N]`.

    With `sync`, the mean is over the tokens of all processes (see `load_balancing_loss`)."""
    logits = _valid(logits.float(), mask)
    num_tokens = _global_sum(logits.new_tensor(float(logits.shape[0])), sync)
    if num_tokens == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / num_tokens * _world(sync)


def expert_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of (token, slot) assignments per expert: `[E]` int64. `indices: [N, k]`, `mask: [N]`."""
    return torch.bincount(_valid(indices, mask).reshape(-1), minlength=num_experts)
