"""Router auxiliary losses, in fp32, over non-padding tokens only.

Unlike the published PESC code (whose "aux loss" averaged top-k gates and was the constant E), the load-balancing
loss here uses the full-softmax probabilities `P_i`, so it has a gradient with respect to the router.
"""

from __future__ import annotations

import torch


def _valid(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t[mask.to(device=t.device, dtype=torch.bool)]


def load_balancing_loss(
    logits: torch.Tensor, indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer loss `E * sum_i f_i * P_i` (without the coefficient alpha).

    Args:
        logits: router logits `[N, E]`.
        indices: chosen experts `[N, k]`.
        mask: bool `[N]`, True for real (non-padding) tokens; None means all tokens count.

    Returns:
        A scalar fp32 tensor; 1.0 for perfectly uniform routing, up to E when all tokens go to one expert.
        `f_i` is the fraction of (token, slot) assignments to expert i and carries no gradient; `P_i`, the mean
        router probability of expert i, carries the gradient.
    """
    logits = _valid(logits.float(), mask)
    indices = _valid(indices, mask)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = torch.softmax(logits, dim=-1)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / indices.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`. `logits: [N, E]`, `mask: [N]`."""
    logits = _valid(logits.float(), mask)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def expert_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of (token, slot) assignments per expert: `[E]` int64. `indices: [N, k]`, `mask: [N]`."""
    return torch.bincount(_valid(indices, mask).reshape(-1), minlength=num_experts)
