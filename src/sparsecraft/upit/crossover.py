"""One child of two parent experts in UpIT's genetic expansion, by the merge `expand.merge` names.

With `d_a = E_a - base`, `d_b = E_b - base` (per tensor; `alpha` weighs parent a, `p` from `expand.p`):

- `dare` (default, the paper's): `base + alpha * DARE_p(d_a) + (1 - alpha) * DARE_p(d_b)`: each delta loses a
  random fraction p of its entries and the rest is rescaled by 1/(1-p); the random masks are the mutation.
- `ties`: `base + TIES(d_a, d_b; weights alpha, 1 - alpha; density 1 - p)`: each delta keeps its largest
  (1 - p) fraction by magnitude, the sign of the weighted sum is elected per entry and only the agreeing parents
  are averaged, weighted (`merge.ties_merge`). Deterministic: alpha is the only random draw.
- `linear`: `base + alpha * d_a + (1 - alpha) * d_b = alpha * E_a + (1 - alpha) * E_b`; p is not used.
  Computed with peft's `task_arithmetic`.

For LoRA experts `lora_merge: product` merges `B @ A` instead of A and B apart (`merge.merge_lora_product`).

peft's merge utilities (`peft.utils.merge_utils`) fit only the linear case. Its `dare_linear` draws its masks
from torch's global generator (a child could not be reproduced from `expand.seed` without reseeding global
state), and its `ties` divides the agreeing weighted deltas by their count rather than by their weights, so
with weights alpha, 1 - alpha an entry where both parents agree becomes `(alpha * d_a + (1 - alpha) * d_b) / 2`:
the child would fall half way back to the base. With unit weights the two TIES agree (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .merge import State, dare_merge, dare_merge_lora_product, merge_lora_product, ties_merge

MERGES = ("dare", "ties", "linear")
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combiner(method: str, alpha: float, p: float) -> Combine:
    """The deterministic per-tensor merges: `(d_a, d_b) -> merged delta` (same shape) for `ties` or `linear`."""
    if method == "linear":
        from peft.utils.merge_utils import task_arithmetic

        weights = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)

        def linear(da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
            return task_arithmetic([da, db], weights.to(da.device, da.dtype))

        return linear
    if method == "ties":

        def ties(da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
            return ties_merge([{"t": da}, {"t": db}], [alpha, 1.0 - alpha], 1.0 - p)["t"]

        return ties
    raise ValueError(f"no deterministic combiner for merge {method!r}")


def merge_separate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                   combine: Combine) -> State:
    """`base + combine(a - base, b - base)` key by key (sorted), in at least fp32, cast back to base's dtype."""
    out: State = {}
    for k in sorted(base):
        dtype = base[k].dtype
        work = torch.promote_types(dtype, torch.float32)
        b0 = base[k].to(work)
        out[k] = (b0 + combine(a[k].to(work) - b0, b[k].to(work) - b0)).to(dtype)
    return out


def child_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], *,
                alpha: float, p: float, method: str, lora_merge: str, generator: torch.Generator) -> State:
    """The child of parents `a` and `b` (expert states with `base`'s keys and shapes) by `method` (`MERGES`);
    `lora_merge`: `separate` (every tensor on its own) or `product` (LoRA `B @ A`, refactored to rank r)."""
    if method == "dare":
        merge = dare_merge_lora_product if lora_merge == "product" else dare_merge
        return merge(a, b, base, alpha, p, generator)
    combine = combiner(method, alpha, p)
    if lora_merge == "product":
        return merge_lora_product(a, b, base, combine, lambda x, y, z: merge_separate(x, y, z, combine))
    return merge_separate(a, b, base, combine)
