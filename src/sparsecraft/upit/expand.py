"""UpIT expert expansion: grow a pool of m experts to n by genetic-style merges of dissimilar parents.

The loop (one child per step, children join the pool and may become parents):

1. similarity of the current pool = `merge.similarity_matrix` (per-layer cosine of the experts' deltas from
   `ExpertSet.base`, summed over decoder layers). The per-layer dot products are kept and grown by one row per
   child (only the child's products are computed), so the reported matrices are exactly what the choices saw;
2. parents (`expand.parents`): `dissimilar` (default) = the pair (i < j) with the LOWEST similarity, ties broken
   by the smaller (i, j) in lexicographic order, SKIPPING pairs already used as parents. Without the skip the
   same pair would often win again (a child of i and j is similar to both, which does not change sim[i, j]) and
   the pool would fill with siblings of one pair. A pool of k >= 2 experts has k(k-1)/2 pairs and at most k-2
   were used, so a pair is always left. `random` (the paper's ablation) = an unused pair drawn uniformly;
3. `alpha ~ U(0, 1)`, then the child by `expand.merge` (`crossover.child_state`): `dare` (default)
   `child = base + alpha * DARE(E_i - base) + (1 - alpha) * DARE(E_j - base)` with the masks drawn from the same
   seeded `torch.Generator` (the mutation), `ties` or `linear`. alpha weighs the lower-index parent i.

One seeded generator draws, per child: the parents (`random` only), alpha, then the DARE masks.
For kind "lora", `lora_merge="separate"` merges A and B independently (cheap; base = the shared initial
LoRA state), `"product"` merges `B @ A` per projection and refactors to rank r by SVD (see
`merge.merge_lora_product`). Everything is deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..atomic import atomic_write_json
from ..errors import CheckpointError, ConfigError
from ..methods import method_for_kind
from ..methods.expert_set import ExpertSet
from .crossover import MERGES, child_state
from .merge import delta_grams, similarity_from_grams

LORA_MERGES = ("separate", "product")
PARENT_CHOICES = ("dissimilar", "random")
PARENT_RULES = {"dissimilar": "lowest similarity pair (i<j), ties by smallest (i,j), pairs already used skipped",
                "random": "an unused pair (i<j) drawn uniformly with the expansion's seeded generator"}
PARENT_RULE = PARENT_RULES["dissimilar"]
SIMILARITY_FORM = "S[i,j] = sum over decoder layers of cos(flatten(E_i - base), flatten(E_j - base))"


@dataclass
class Expansion:
    """The result of `genetic_expansion`: the grown pool and how it was grown.

    states/names: the n experts, the m originals first (the same dict objects), then the children in birth order.
    lineage: one record per child, see `genetic_expansion`. similarity_before `[m][m]`, similarity_after `[n][n]`.
    """

    states: list[dict[str, torch.Tensor]]
    names: list[str]
    lineage: list[dict[str, Any]]
    similarity_before: list[list[float]]
    similarity_after: list[list[float]]


def choose_parents(sim: torch.Tensor, used: set[tuple[int, int]]) -> tuple[int, int]:
    """The unused pair (i < j) of `sim [k, k]` with the lowest similarity; ties go to the smallest (i, j)."""
    best: tuple[int, int] | None = None
    best_val = float("inf")
    k = sim.shape[0]
    for i in range(k):
        for j in range(i + 1, k):
            v = float(sim[i, j])
            if (i, j) not in used and v < best_val:  # strict: an equal value later in order never wins
                best, best_val = (i, j), v
    if best is None:
        raise ConfigError("expand: no unused pair of parents is left")  # unreachable for k >= 2 (see module doc)
    return best


def random_parents(k: int, used: set[tuple[int, int]], generator: torch.Generator) -> tuple[int, int]:
    """An unused pair (i < j) of a pool of k experts, uniformly at random (pairs in lexicographic order)."""
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k) if (i, j) not in used]
    if not pairs:
        raise ConfigError("expand: no unused pair of parents is left")
    return pairs[int(torch.randint(len(pairs), (), generator=generator))]


def _add_to_grams(grams: torch.Tensor, pool: list[dict[str, torch.Tensor]],
                  base: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[G, k+1, k+1]`: `grams [G, k, k]` of pool[:-1] plus the dot products of the newest expert pool[-1]."""
    _, row = delta_grams(pool[-1:], pool, base)  # [G, 1, k+1]
    g, k, _ = grams.shape
    out = grams.new_zeros(g, k + 1, k + 1)
    out[:, :k, :k] = grams
    out[:, k, :] = row[:, 0]
    out[:, :, k] = row[:, 0]
    return out


def genetic_expansion(states: list[dict[str, torch.Tensor]], names: list[str], base: dict[str, torch.Tensor],
                      n: int, *, p: float = 0.5, seed: int = 0, merge: str = "separate", method: str = "dare",
                      parents: str = "dissimilar", progress: bool | None = None) -> Expansion:
    """Grow `states` (m experts) to n experts; see the module docstring for the rule.

    merge: "separate" (every key on its own) or "product" (LoRA `B @ A` merge + SVD refactor).
    method: the merge of two parents, `dare`, `ties` or `linear` (`crossover`). parents: `dissimilar` or `random`.
    progress: tqdm bar over children (None: only on a terminal).
    Lineage record per child: `{"index", "name", "parents": [{"index", "name"}, {"index", "name"}], "alpha",
    "p" (None for linear), "similarity" (of the parents, when chosen), "merge" (`dare`, `ties`, `linear`, with
    `-lora-product` for the product merge), "parent_rule", "seed"}`; child names are `child-{index}({i}x{j})`.
    """
    m = len(states)
    if len(names) != m:
        raise ConfigError(f"expand: {m} expert states but {len(names)} names")
    if merge not in LORA_MERGES:
        raise ConfigError(f"expand: lora_merge must be one of {LORA_MERGES}, got {merge!r}")
    if method not in MERGES:
        raise ConfigError(f"expand: merge must be one of {MERGES}, got {method!r}")
    if parents not in PARENT_CHOICES:
        raise ConfigError(f"expand: parents must be one of {PARENT_CHOICES}, got {parents!r}")
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"expand: DARE drop rate p must be in [0, 1), got {p}")
    if n < m:
        raise ConfigError(f"expand: target n={n} is below the {m} prepared experts (choose fewer checkpoints)")
    if n > m and m < 2:
        raise ConfigError(f"expand: need at least 2 experts to breed children, got {m}")
    label = f"{method}-lora-product" if merge == "product" else method

    pool = list(states)
    pool_names = list(names)
    _, grams = delta_grams(pool, pool, base)  # [G, k, k]; grown by one row and column per child
    sim = similarity_from_grams(grams)
    before = sim.tolist()
    gen = torch.Generator().manual_seed(int(seed))
    used: set[tuple[int, int]] = set()
    lineage: list[dict[str, Any]] = []
    for _ in tqdm(range(n - m), desc="expand", unit="expert", disable=None if progress is None else not progress):
        i, j = choose_parents(sim, used) if parents == "dissimilar" else random_parents(len(pool), used, gen)
        used.add((i, j))
        alpha = float(torch.rand((), generator=gen, dtype=torch.float64))
        child = child_state(pool[i], pool[j], base, alpha=alpha, p=p, method=method, lora_merge=merge, generator=gen)
        index = len(pool)
        name = f"child-{index}({i}x{j})"
        lineage.append({"index": index, "name": name,
                        "parents": [{"index": i, "name": pool_names[i]}, {"index": j, "name": pool_names[j]}],
                        "alpha": alpha, "p": None if method == "linear" else p, "similarity": float(sim[i, j]),
                        "merge": label, "parent_rule": parents, "seed": int(seed)})
        pool.append(child)
        pool_names.append(name)
        grams = _add_to_grams(grams, pool, base)
        sim = similarity_from_grams(grams)
    return Expansion(states=pool, names=pool_names, lineage=lineage, similarity_before=before,
                     similarity_after=sim.tolist())


def expand(es: ExpertSet, n: int, *, p: float = 0.5, seed: int = 0, lora_merge: str = "separate",
           merge: str = "dare", parents: str = "dissimilar", progress: bool | None = None) -> ExpertSet:
    """A new ExpertSet with n experts: `es`'s m experts first, then n - m children (see `genetic_expansion`).

    `base` and `shared` are the same objects as in `es`; meta gains `expansion` (enabled, m, n, p, seed, merge,
    lora_merge, parents, parent rule, similarity form), `lineage` (appended to any earlier lineage),
    `similarity_before` `[m][m]` and `similarity_after` `[n][n]`. lora_merge="product" needs factored (LoRA)
    experts.
    """
    es.validate()
    if lora_merge == "product" and not method_for_kind(es.kind).factored_experts:
        raise ConfigError(f"expand: lora_merge='product' needs LoRA experts, these are {es.kind!r}")
    result = genetic_expansion(list(es.states), list(es.names), es.base, n, p=p, seed=seed, merge=lora_merge,
                               method=merge, parents=parents, progress=progress)
    meta = dict(es.meta)
    meta["expansion"] = {"enabled": True, "from": len(es.states), "to": n, "p": p, "seed": int(seed),
                         "merge": merge, "lora_merge": lora_merge, "parents": parents,
                         "parent_rule": PARENT_RULES[parents], "similarity": SIMILARITY_FORM}
    meta["lineage"] = list(es.meta.get("lineage", [])) + result.lineage
    meta["similarity_before"] = result.similarity_before
    meta["similarity_after"] = result.similarity_after
    return dataclasses.replace(es, states=result.states, names=result.names, meta=meta)


def _as_lists(matrix: torch.Tensor | list[list[float]]) -> list[list[float]]:
    return matrix.tolist() if isinstance(matrix, torch.Tensor) else [[float(v) for v in row] for row in matrix]


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1)


def write_expansion_report(directory: str | os.PathLike, before: torch.Tensor | list[list[float]],
                           after: torch.Tensor | list[list[float]], lineage: list[dict[str, Any]], *,
                           names: list[str] | None = None, settings: dict[str, Any] | None = None) -> None:
    """Write `directory/similarity.json` and `directory/lineage.json` (each atomically).

    similarity.json: `{"form", "before": [m][m], "after": [n][n], "names_before"?, "names_after"?, "expansion"?}`
    (names when given: the n names after expansion, the first m of which are the originals; `expansion`: the
    `settings` when given, what the stage did). lineage.json: the list of child records from `genetic_expansion`.
    """
    directory = Path(directory)
    before, after = _as_lists(before), _as_lists(after)
    if names is not None and len(names) != len(after):
        raise ConfigError(f"write_expansion_report: {len(names)} names for a {len(after)}x{len(after)} matrix")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        sim: dict[str, Any] = {"form": SIMILARITY_FORM, "before": before, "after": after}
        if names is not None:
            sim["names_before"], sim["names_after"] = list(names[: len(before)]), list(names)
        if settings is not None:
            sim["expansion"] = dict(settings)
        _write_json_atomic(directory / "similarity.json", sim)
        _write_json_atomic(directory / "lineage.json", lineage)
    except OSError as e:
        raise CheckpointError(f"cannot write the expansion report to {directory}: {e}") from e
