"""Merging expert states: DARE, linear, TIES, the pairwise similarity of experts, and LoRA product refactoring.

An expert state is a dict `{key: tensor}`; every function here takes dicts with equal keys and equal shapes and
returns a new dict (inputs are never modified). Deltas are `state - base`. Arithmetic runs in at least fp32 and
the result is cast back to the input dtype, so bf16 experts merge without bf16 rounding in the intermediate sums.
Keys are visited in sorted order, so the random draws of a seeded `torch.Generator` do not depend on dict order.

Why these functions are written here rather than taken from mergekit: mergekit 0.1.5 (the version on the index)
is LGPL-3.0-only while sparsecraft is Apache-2.0, and it would add pydantic, immutables, click, scipy,
sentencepiece, protobuf and huggingface_hub to our dependencies. Its pins do not conflict with ours
(`transformers>=5.0,<6`, `peft>=0.18`, `accelerate>=1.6`), but its merge methods do not fit: they operate on
`TensorGroup`s inside mergekit's task graph and executor (a whole-model, YAML-driven merge), not on in-memory
tensor dicts; its DARE mask is drawn with `torch.bernoulli` from the global RNG (no `generator` argument, so a
child cannot be reproduced from our seed without reseeding global state), and its DARE rescaling matches the L1
norm of the delta rather than the paper's exact `1/(1-p)`. The methods UpIT needs are a few lines each.

Shapes: every tensor keeps the shape it has in the expert dicts (e.g. LoRA `A [r, in]`, `B [out, r]`, FFN
weights `[out, in]`); `similarity_matrix` returns `[n, n]` float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import ConfigError

State = dict[str, torch.Tensor]

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
OTHER_GROUP = "other"  # the similarity group of keys outside any `layers.{i}.` prefix


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 for the arithmetic (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _check_keys(dicts: Sequence[Mapping[str, torch.Tensor]], what: str) -> list[str]:
    """The sorted common keys; ConfigError when keys or shapes differ."""
    if not dicts:
        raise ConfigError(f"{what}: nothing to merge")
    keys = sorted(dicts[0])
    for d in dicts[1:]:
        if sorted(d) != keys:
            missing = sorted(set(keys) ^ set(d))
            raise ConfigError(f"{what}: expert states have different keys (e.g. {missing[:3]})")
        for k in keys:
            if d[k].shape != dicts[0][k].shape:
                raise ConfigError(f"{what}: {k} has shape {tuple(d[k].shape)} vs {tuple(dicts[0][k].shape)}")
    return keys


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"DARE drop rate p must be in [0, 1), got {p}")


def dare(delta: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al., 2023): drop each element with probability p, rescale the kept ones by 1/(1-p).

    `delta` any shape; returns the same shape and dtype. The Bernoulli(1-p) keep mask is drawn on the
    generator's device (normally CPU) as `rand >= p`, so E[dare(delta)] = delta. p = 0 returns a copy and
    draws nothing from the generator.
    """
    _check_p(p)
    if p == 0.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) >= p
    work = delta.to(_work_dtype(delta.dtype))
    return (work * keep.to(work.device, work.dtype) / (1.0 - p)).to(delta.dtype)


def linear_merge(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """`sum_i weights[i] * deltas[i]` per key (no normalisation of the weights)."""
    if len(deltas) != len(weights):
        raise ConfigError(f"linear_merge: {len(deltas)} deltas but {len(weights)} weights")
    keys = _check_keys(deltas, "linear_merge")
    out: State = {}
    for k in keys:
        dtype = deltas[0][k].dtype
        acc = torch.zeros(deltas[0][k].shape, dtype=_work_dtype(dtype), device=deltas[0][k].device)
        for d, w in zip(deltas, weights):
            acc += float(w) * d[k].to(acc.dtype)
        out[k] = acc.to(dtype)
    return out


def dare_merge(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
               alpha: float, p: float, generator: torch.Generator) -> State:
    """`child = base + alpha * DARE(a - base) + (1 - alpha) * DARE(b - base)`, key by key.

    Masks are drawn per key in sorted key order, first for `a` then for `b` (independent masks). With p = 0
    this is the linear interpolation `alpha * a + (1 - alpha) * b`.
    """
    _check_p(p)
    keys = _check_keys([a, b, base], "dare_merge")
    out: State = {}
    for k in keys:
        dtype = base[k].dtype
        wd = _work_dtype(dtype)
        b0 = base[k].to(wd)
        da = dare(a[k].to(wd) - b0, p, generator)
        db = dare(b[k].to(wd) - b0, p, generator)
        out[k] = (b0 + alpha * da + (1.0 - alpha) * db).to(dtype)
    return out


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `ceil(density * numel)` largest-magnitude entries (at least one), zero the rest."""
    if density >= 1.0 or delta.numel() == 0:
        return delta
    k = max(1, math.ceil(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return (flat * keep).reshape(delta.shape)


def ties_merge(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], density: float) -> State:
    """TIES (Yadav et al., 2023) on deltas; returns the merged delta (add it to the base yourself).

    Per key: trim each delta to its top `density` fraction by magnitude, scale by its weight, elect the sign of
    the sum, and average (weighted) only the entries that agree with the elected sign:
    `sum_i [sign(t_i) = s] t_i / sum_i [sign(t_i) = s] w_i`, where `t_i = w_i * trim(delta_i)`. Entries where
    no delta agrees are 0.
    """
    if len(deltas) != len(weights):
        raise ConfigError(f"ties_merge: {len(deltas)} deltas but {len(weights)} weights")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"ties_merge: density must be in (0, 1], got {density}")
    keys = _check_keys(deltas, "ties_merge")
    out: State = {}
    for k in keys:
        dtype = deltas[0][k].dtype
        wd = _work_dtype(dtype)
        w = torch.tensor([float(x) for x in weights], dtype=wd).view(-1, *([1] * deltas[0][k].dim()))
        t = torch.stack([_trim(d[k].to(wd), density) for d in deltas]) * w.to(deltas[0][k].device)
        elected = torch.sign(t.sum(0))
        agree = (torch.sign(t) == elected) & (t != 0)
        num = (t * agree).sum(0)
        den = (w.to(t.device) * agree).sum(0)
        out[k] = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), 0.0).to(dtype)
    return out


def layer_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group canonical keys by decoder layer: `{"layers.{i}": [keys...], ..., "other": [...]}`.

    Layers come in numeric order; keys outside any `layers.{i}.` prefix form one last group "other" (absent
    when empty). Keys inside a group are sorted.
    """
    groups: dict[int, list[str]] = {}
    other: list[str] = []
    for k in sorted(keys):
        m = _LAYER_KEY.match(k)
        if m:
            groups.setdefault(int(m.group(1)), []).append(k)
        else:
            other.append(k)
    out = {f"layers.{i}": groups[i] for i in sorted(groups)}
    if other:
        out[OTHER_GROUP] = other
    return out


def _key_deltas(ds: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """`[len(ds), numel]` float64 CPU: the flattened deltas of one key."""
    b0 = base[key].detach().to("cpu", torch.float64).reshape(-1)
    return torch.stack([d[key].detach().to("cpu", torch.float64).reshape(-1) - b0 for d in ds])


def delta_grams(queries: Sequence[Mapping[str, torch.Tensor]], states: Sequence[Mapping[str, torch.Tensor]],
                base: Mapping[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """Per layer group, the dot products of deltas: `(group names, dots [G, len(queries), len(states)])` float64.

    `dots[g, q, s] = <vec_g(queries[q] - base), vec_g(states[s] - base)>`, where `vec_g` flattens and concatenates
    the deltas of the keys of group g (`layer_groups`). Accumulated key by key in float64 on CPU, so only one
    key's `[n, numel]` deltas are materialised at a time.
    """
    keys = _check_keys([base, *queries, *states], "similarity")
    groups = layer_groups(keys)
    dots = torch.zeros(len(groups), len(queries), len(states), dtype=torch.float64)
    for g, group in enumerate(groups.values()):
        for k in group:
            dq = _key_deltas(queries, base, k)
            ds = dq if states is queries else _key_deltas(states, base, k)
            dots[g] += dq @ ds.T
    return list(groups), dots


def delta_sq_norms(states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`[G, n]` float64: the squared norm of each state's delta in each layer group (`layer_groups` order)."""
    groups = layer_groups(_check_keys([base, *states], "similarity"))
    sq = torch.zeros(len(groups), len(states), dtype=torch.float64)
    for g, group in enumerate(groups.values()):
        for k in group:
            sq[g] += _key_deltas(states, base, k).square().sum(1)
    return sq


def cosine_sum(dots: torch.Tensor, q_sq: torch.Tensor, s_sq: torch.Tensor) -> torch.Tensor:
    """`[q, s]`: `sum_g dots[g] / (|q|_g |s|_g)` from dots `[G, q, s]` and squared norms `q_sq [G, q]`, `s_sq [G, s]`.

    A zero delta (squared norm 0) has cosine 0 with everything, itself included.
    """
    denom = q_sq.clamp_min(0).sqrt()[:, :, None] * s_sq.clamp_min(0).sqrt()[:, None, :]
    return torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0).sum(0)


def cross_similarity(queries: Sequence[Mapping[str, torch.Tensor]], states: Sequence[Mapping[str, torch.Tensor]],
                     base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`[len(queries), len(states)]` float64: `S[q, s] = sum_g cos(vec_g(q - base), vec_g(s - base))`.

    One cosine in [-1, 1] per layer group g (see `delta_grams`), so with L groups S lies in [-L, L].
    A zero delta has cosine 0 with everything (itself included).
    """
    _, dots = delta_grams(queries, states, base)
    return cosine_sum(dots, delta_sq_norms(queries, base), delta_sq_norms(states, base))


def similarity_matrix(states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`[n, n]` float64, symmetric: per-layer cosine of the experts' deltas from `base`, summed over layer groups.

    `S[i, j] = sum_g cos(vec_g(E_i - base), vec_g(E_j - base))` (see `delta_grams`); the diagonal is the number
    of groups in which the expert's delta is non-zero.
    """
    states = list(states)
    _, dots = delta_grams(states, states, base)
    return similarity_from_grams(dots)


def similarity_from_grams(dots: torch.Tensor) -> torch.Tensor:
    """`[n, n]` summed cosines from a square Gram stack `dots [G, n, n]` (its diagonal holds the squared norms)."""
    dots = (dots + dots.transpose(1, 2)) / 2  # exact symmetry despite summation order
    sq = torch.diagonal(dots, dim1=1, dim2=2)
    return cosine_sum(dots, sq, sq)


# ---- LoRA product merging ------------------------------------------------------------------------------------

def lora_pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    """`[(key of A, key of B), ...]` for every `*.lora_A` key; ConfigError when a partner `*.lora_B` is missing."""
    pairs = []
    key_set = set(keys)
    for k in sorted(keys):
        if k.endswith(".lora_A"):
            kb = k[: -len("lora_A")] + "lora_B"
            if kb not in key_set:
                raise ConfigError(f"LoRA state has {k} but no {kb}")
            pairs.append((k, kb))
    n_b = sum(k.endswith(".lora_B") for k in keys)
    if n_b != len(pairs):
        raise ConfigError("LoRA state has lora_B keys without a matching lora_A")
    return pairs


def refactor_low_rank(delta_w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of `delta_w [out, in]` by SVD: `B' = U_r S_r^{1/2}` `[out, r]`,
    `A' = S_r^{1/2} V_r^T` `[r, in]`.

    `B' @ A'` equals `delta_w` exactly (up to rounding) when its rank is at most r, else it is the best rank-r
    approximation (Eckart-Young). Computed in float64, returned in `delta_w`'s dtype.
    """
    u, s, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if a.shape[0] < r:  # min(out, in) < r: pad with zero rank components so shapes stay [r, in] / [out, r]
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    return b.to(delta_w.dtype), a.to(delta_w.dtype)


def merge_lora_product(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       base: Mapping[str, torch.Tensor], combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       merge_rest: Callable[[State, State, State], State]) -> State:
    """Merge LoRA experts through their products with `combine`, then refactor each projection to rank r by SVD.

    For each pair (`X.lora_A [r, in]`, `X.lora_B [out, r]`) with `P = B @ A` (the common alpha/r scaling is left
    out, it cancels): `P_child = P_base + combine(P_a - P_base, P_b - P_base)` (float64 `[out, in]` deltas in,
    the merged delta out), and the child stores `B', A' = refactor_low_rank(P_child, r)`. Unlike merging the
    factors this interpolates the functions the experts compute (`B A`), not their factors, at the cost of an SVD
    per projection and a rank-r truncation (a merge of two rank-r products generally has higher rank). The
    child's A' no longer starts from the shared initial A, so its factor deltas are not comparable with the
    parents' for similarity. Keys that are not LoRA factors go to `merge_rest(a, b, base)` first (so a seeded
    generator is drawn from in the same order every time), then the pairs in sorted order.
    """
    keys = _check_keys([a, b, base], "merge_lora_product")
    pairs = lora_pairs(keys)
    paired = {k for pair in pairs for k in pair}
    rest = [k for k in keys if k not in paired]
    out: State = merge_rest({k: a[k] for k in rest}, {k: b[k] for k in rest}, {k: base[k] for k in rest}) \
        if rest else {}
    for ka, kb in pairs:
        dtype = base[ka].dtype
        r = base[ka].shape[0]
        p0, pa, pb = (s[kb].double() @ s[ka].double() for s in (base, a, b))
        new_b, new_a = refactor_low_rank(p0 + combine(pa - p0, pb - p0), r)
        out[ka], out[kb] = new_a.to(dtype), new_b.to(dtype)
    return {k: out[k] for k in keys}


def dare_merge_lora_product(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                            base: Mapping[str, torch.Tensor], alpha: float, p: float,
                            generator: torch.Generator) -> State:
    """`merge_lora_product` with DARE: `P_child = P_base + alpha * DARE(P_a - P_base) + (1 - alpha) *
    DARE(P_b - P_base)`; keys that are not LoRA factors are merged as in `dare_merge`."""
    _check_p(p)

    def combine(da: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        return alpha * dare(da, p, generator) + (1.0 - alpha) * dare(db, p, generator)

    return merge_lora_product(a, b, base, combine, lambda x, y, z: dare_merge(x, y, z, alpha, p, generator))
