"""Top-k routing: which experts each token uses and with what gate.

The router is a bias-free linear map `W_r: [E, h]` on the FFN input. Routing runs in fp32 by default whatever the
model dtype, because top-k over bf16 logits flips choices for near-ties (see docs/design.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    top_k: int,
    order: str = "topk_softmax",
    normalize_topk: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    selection_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route tokens to experts.

    Args:
        x: router input `[N, h]`.
        weight: router weight `[E, h]`.
        top_k: number of experts per token.
        order: `topk_softmax` (softmax over the k kept logits, PESC) or `softmax_topk` (softmax over all E, then
            top-k, Mixtral/Sparsetral), optionally renormalised with `normalize_topk`.
        compute_dtype: dtype of the matmul and softmax; None keeps the dtype of `x`.
        selection_bias: `[E]` added to the scores for choosing the top-k only (auxiliary-loss-free balancing);
            the gates come from the unbiased scores.

    Returns:
        gates `[N, k]` (in `compute_dtype`, larger gate first), expert indices `[N, k]` (int64), and router
        logits `[N, E]` in fp32 for the auxiliary losses.
    """
    dtype = compute_dtype or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the fp32 router in bf16
            logits = F.linear(x.to(dtype), weight.to(dtype))
    else:
        logits = F.linear(x.to(dtype), weight.to(dtype))
    gates, indices = gates_from_logits(logits, top_k, order, normalize_topk, selection_bias)
    return gates, indices, logits.float()


def gates_from_logits(
    logits: torch.Tensor, top_k: int, order: str = "topk_softmax", normalize_topk: bool = True,
    selection_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choice and gates from router logits `[N, E]`: gates `[N, k]` (logits' dtype, larger first) and
    expert indices `[N, k]` int64. The one place the routing orders are defined (`route` and the routing
    statistics both use it)."""
    if order == "topk_softmax":
        if selection_bias is None:
            top_logits, indices = torch.topk(logits, top_k, dim=-1)
        else:  # chosen by the biased scores, gated by the model's own
            indices = torch.topk(logits + selection_bias.to(logits.dtype), top_k, dim=-1).indices
            top_logits = logits.gather(-1, indices)
        gates = torch.softmax(top_logits, dim=-1)
    elif order == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        if selection_bias is None:
            gates, indices = torch.topk(probs, top_k, dim=-1)
        else:
            indices = torch.topk(probs + selection_bias.to(probs.dtype), top_k, dim=-1).indices
            gates = probs.gather(-1, indices)
        if normalize_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown routing order {order!r}")
    return gates, indices
