"""UpIT stage 3, steps 3-4: router rows pre-trained on the bucketed seed records, and routing accuracy.

Training runs on the MoE of all n experts (experts frozen unless `route.freeze_experts: false`): per batch
`lm_weight * L_lm + aux_weight * L_aux`, with L_lm the response-token LM loss and, per MoE layer,
`L_aux = BCE(sigmoid(h·r_b), 1)` for the tokens of a record of bucket b; with `negatives` the other rows get
`BCE(sigmoid(h·r_i), 0)` averaged over i != b, and the two halves are averaged (otherwise positives alone would
let every logit grow). Averaged over layers and tokens.

Accuracy on held-out seed records: a record is routed right when the argmax of its router probabilities (softmax
of the logits), averaged over layers and its scored tokens, is its bucket. The token-level rate (top-1 expert of
each (layer, token) == bucket) is reported too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..moe.parts import set_trainable
from ..train.nll import row_nll
from .buckets import forward_batch, iter_batches, scored_mask
from .config import RouteSettings


def routing_loss(out, batch: dict, buckets: torch.Tensor, settings: RouteSettings) -> tuple[torch.Tensor, dict]:
    """`lm_weight * L_lm + aux_weight * L_aux` of one batch; `buckets: [B]` bucket of each row."""
    device = out.logits.device
    labels = batch["labels"].to(device)
    total, count = row_nll(out.logits, batch["input_ids"].to(device), labels != -100)
    lm = total.sum() / count.sum().clamp(min=1)
    mask = scored_mask(batch, settings.tokens).to(device).reshape(-1)  # [N]
    target = buckets.to(device)[:, None].expand(labels.shape).reshape(-1)[mask]  # [n]
    layers = []
    for logits in out.router_logits:  # one [N, E] per MoE layer
        z = logits.float()[mask]
        pos = F.binary_cross_entropy_with_logits(z.gather(1, target[:, None]).squeeze(1), torch.ones_like(target,
                                                 dtype=z.dtype))
        if settings.negatives and z.shape[1] > 1:
            others = torch.ones_like(z, dtype=torch.bool).scatter_(1, target[:, None], False)
            neg = F.binary_cross_entropy_with_logits(z[others], torch.zeros(int(others.sum()), device=device))
            layers.append(0.5 * (pos + neg))
        else:
            layers.append(pos)
    aux = torch.stack(layers).mean()
    loss = settings.lm_weight * lm + settings.aux_weight * aux
    return loss, {"lm": lm.item(), "aux": aux.item()}


@torch.no_grad()
def routing_accuracy(model, dataset, collator, buckets: torch.Tensor, batch_size: int, scope: str,
                     device="cpu") -> dict:
    """Record accuracy (mean router probabilities over layers and scored tokens, argmax == bucket) and token
    accuracy (top-1 expert of each layer and scored token == bucket), over `dataset` with `buckets: [S]`."""
    if len(dataset) == 0:
        return {"records": 0, "record_accuracy": None, "token_accuracy": None}
    right, token_right, tokens = 0, 0.0, 0
    for idx, batch in iter_batches(dataset, collator, batch_size):
        out = forward_batch(model, batch, device, output_router_logits=True)
        mask = scored_mask(batch, scope).to(device)  # [B, T]
        b, t = mask.shape
        probs = torch.stack([torch.softmax(z.float(), -1).reshape(b, t, -1) for z in out.router_logits])  # [L,B,T,E]
        weight = mask[None, :, :, None].float()
        mean = (probs * weight).sum((0, 2)) / (weight.sum((0, 2)).clamp(min=1))  # [B, E]
        want = buckets[idx].to(device)
        right += int((mean.argmax(-1) == want).sum())
        top1 = probs.argmax(-1)  # [L, B, T]
        hit = (top1 == want[None, :, None]) & mask[None]
        token_right += float(hit.sum())
        tokens += int(mask.sum()) * probs.shape[0]
    return {"records": len(dataset), "record_accuracy": right / len(dataset),
            "token_accuracy": token_right / max(tokens, 1)}


def pretrain_router(model, dataset, collator, buckets: torch.Tensor, settings: RouteSettings,
                    device="cpu", progress: bool = True) -> list[dict]:
    """Train the router rows (and the experts unless frozen) on the bucketed seed records; returns per-epoch
    mean losses. The model stays in eval mode (no dropout) while its router learns."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    set_trainable(model, routers=True, experts=not settings.freeze_experts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    history = []
    steps_per_epoch = math.ceil(len(dataset) / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * steps_per_epoch))
    bar = tqdm(total=total, desc="route: router pre-training", unit="step", disable=not progress)
    step = 0
    while step < total:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        sums = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "batches": 0}
        for idx, batch in iter_batches(dataset, collator, settings.batch_size, order):
            if step >= total:
                break
            out = forward_batch(model, batch, device, output_router_logits=True)
            loss, parts = routing_loss(out, batch, buckets[idx], settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += loss.item()
            sums["lm"] += parts["lm"]
            sums["aux"] += parts["aux"]
            sums["batches"] += 1
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{parts['aux']:.3f}")
        n = max(sums.pop("batches"), 1)
        history.append({k: v / n for k, v in sums.items()})
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return history
