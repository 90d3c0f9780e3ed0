"""Next-token negative log-likelihood of a causal LM's logits, per token and summed per row.

Position t of `logits [B, T, V]` predicts token t + 1, so the results cover the `T - 1` predicted positions.
The training loop's held-out loss and UpIT's expert perplexities / router LM loss are both computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value are not predicted (the label of a masked prompt token)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`[B, T-1]` fp32 NLL of `targets[:, 1:]` under `logits[:, :-1]`; 0 where the target is `ignore_index`.
    `logits [B, T, V]`, `targets [B, T]` (labels, or the input ids themselves)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[:, 1:], ignore_index=ignore_index,
                           reduction="none")


def row_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
            ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row `(sum of NLL, number of scored tokens)`, both `[B]`, over the next-token predictions.

    Scored tokens: those whose target is not `ignore_index`, or with `mask [B, T]` (bool) the positions it marks
    among `targets[:, 1:]` (e.g. every real token, with the input ids as targets).
    """
    nll = token_nll(logits, targets, ignore_index)  # [B, T-1]
    if mask is None:
        return nll.sum(-1), (targets[:, 1:] != ignore_index).sum(-1)
    keep = mask[:, 1:]
    return (nll * keep).sum(-1), keep.sum(-1)
