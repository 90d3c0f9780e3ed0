"""UpIT seed buckets: which expert's router row each seed record trains, from every expert's NLL on it.

Input: `nll [E, S]`, the mean scored-token NLL (log perplexity) of seed record s under the dense model carrying
expert e alone. Three rules (`route.bucketing`):

- `balanced` (default): normalise per expert (`route.normalise`, see `normalise`), then the minimum-cost
  assignment in which every expert gets floor(S/E) or ceil(S/E) records (`balanced_assignment`). When S >= E
  every expert gets at least one record, whatever the perplexities are. `route.min_share` below 1 relaxes this to
  at least floor(min_share * S/E) records each (`quotas`), the rest going where the scores are lowest: natural
  slices of unequal size are then kept whole, and every expert still gets records when that floor is >= 1.
- `argmin`: each record to the expert with the lowest raw NLL (the rule before issue 17; `route.normalise` does
  not apply). Collapses when one expert (typically the last checkpoint) is best on nearly every record.
- `random`: a seeded random balanced assignment that ignores the NLLs (the paper's "router initialised on
  random data" ablation).

Why a normalisation and a matching: a record's NLL is `difficulty(record) + offset(expert) + fit(expert,
record)`. Argmin compares raw values, so a global offset (a later checkpoint is better everywhere) decides
everything. Under an exactly balanced assignment every record is placed once and every expert takes a fixed
number of records, so record difficulty and expert offsets add the same constant to every feasible assignment
and drop out; what is left is where an expert is good relative to the others. The default normalisation,
`margin`, removes both explicitly, so neither decides when the counts may vary (min_share < 1) either.

Balanced and random assignments are made separately for the training part and the held-out part of the seed, so
the router pre-training data itself is balanced.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BUCKETINGS = ("balanced", "argmin", "random")
NORMALISATIONS = ("margin", "zscore", "rank", "none")
RULES = {
    "balanced": "scores normalised per expert (route.normalise), then the minimum-cost assignment giving every "
                "expert between quota[0] and quota[1] records, training and held-out parts apart",
    "argmin": "each record to the expert with the lowest raw perplexity (first on ties)",
    "random": "a seeded random balanced assignment, perplexities ignored (training and held-out parts apart)",
}
_EPS = 1e-9  # a path must beat another by more than this to replace it (no loops from rounding)


def normalise(nll: torch.Tensor, how: str) -> torch.Tensor:
    """Per-expert normalised scores `[E, S]` (float64; lower = the expert is better on that record).

    margin: `m[e, s] = nll[e, s] - mean_e' nll[e', s]` (the expert's margin over the record's mean across all
        experts: the record's difficulty removed), then `m[e, s] - mean_s' m[e, s']` (the expert's own average
        margin removed: a checkpoint better everywhere is not better anywhere in particular). In nats.
    zscore: `(nll[e, s] - mean_e) / std_e`, mean and (population) std over the S records of expert e's row;
        a row with std 0 becomes all zeros.
    rank:   `(rank of nll[e, s] within row e) / (S - 1)`, ranks from 0 (lowest NLL) to S - 1, tied values
        sharing their average rank; in [0, 1].
    none:   the raw NLL.
    zscore and rank remove each expert's offset and spread but keep the record difficulty inside each row, so
    when the experts' spreads differ, hard records lean towards the expert with the widest spread; margin
    removes the difficulty first.
    """
    x = nll.double()
    if how == "none":
        return x.clone()
    if how == "margin":
        m = x - x.mean(0, keepdim=True)
        return m - m.mean(1, keepdim=True)
    if how == "zscore":
        mean = x.mean(1, keepdim=True)
        std = x.std(1, unbiased=False, keepdim=True)
        return torch.where(std > 0, (x - mean) / torch.where(std > 0, std, torch.ones_like(std)), 0.0)
    if how == "rank":
        s = x.shape[1]
        below = (x[:, :, None] > x[:, None, :]).sum(2).double()  # [E, S]: records with a lower NLL
        ties = (x[:, :, None] == x[:, None, :]).sum(2).double() - 1  # other records with the same NLL
        return (below + ties / 2) / max(s - 1, 1)
    raise ValueError(f"unknown normalisation {how!r}")


def quotas(records: int, experts: int, min_share: float = 1.0) -> tuple[int, int]:
    """(fewest, most) records per expert. `min_share` 1: floor(S/E) and ceil(S/E) (exactly balanced); below 1:
    at least floor(min_share * S/E) each, and at most what the others' minimums leave."""
    if min_share >= 1.0:
        low, extra = divmod(records, experts)
        return low, low + (extra > 0)
    low = math.floor(min_share * records / experts + 1e-9)  # 0.5 * 12 / 3 is 2, whatever the rounding
    return low, records - (experts - 1) * low


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: the assignment's tensors are tiny and intra-op threads cost more than the work
    (8 experts x 1600 records: 0.3 s on one thread, 12 s with two on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def balanced_assignment(cost: torch.Tensor, low: int | None = None, high: int | None = None) -> torch.Tensor:
    """The minimum-cost assignment of S records to E experts in which each expert gets between `low` and `high`
    records (default: floor(S/E) and ceil(S/E), i.e. exactly balanced; `quotas`).

    `cost [E, S]`; returns `[S]` int64 expert indices. Exact, by successive shortest paths (min-cost flow):
    every expert has `low` places that must be filled and may take up to `high - low` of the `S - E * low` extra
    places. Records are placed one at a time in index order. Record s enters expert b at cost `cost[b, s]` and may
    push a record r from b on to expert c (at `cost[c, r] - cost[b, r]`), and so on, until an expert below `low`
    takes it, or an expert takes an extra place; when those are all taken, an expert holding one may give it up
    by pushing one of its records on (the node X below). The cheapest such chain is found by Bellman-Ford over
    the E experts and X. After each record the assignment of the records placed so far is optimal, so the last
    one is optimal for all (tested against brute force).

    Ties: a chain replaces an equal one only when strictly cheaper, and among equally cheap ends the lowest index
    wins (experts before X), so equal costs fill expert 0 first, then 1, ...
    Work: O(S * E^2) tensor elements plus O(S * E) small tensor ops (1600 records, 8 experts: well under 1 s).
    """
    num, total = cost.shape
    default_low, default_high = quotas(total, num)
    low = default_low if low is None else low
    high = default_high if high is None else high
    if not (0 <= low <= high and num * low <= total <= num * high):
        raise ValueError(f"cannot give each of {num} experts {low} to {high} of {total} records")
    with _one_thread():
        return _balanced(cost.double(), low, high)


def _balanced(c: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """`balanced_assignment` of float64 costs `[E, S]`."""
    num, total = c.shape
    extra = total - num * low  # the extra places, shared by all experts
    x = num  # the node of the extra places
    bucket = torch.full((total,), -1, dtype=torch.long)
    members: list[list[int]] = [[] for _ in range(num)]
    inf = float("inf")
    # moves[a, b]: the cheapest move of one record from expert a to expert b, arg[a, b] that record; a row is
    # recomputed only when expert a's records changed
    moves = torch.full((num, num), inf, dtype=torch.float64)
    arg = torch.full((num, num), -1, dtype=torch.long)
    changed: set[int] = set()
    for s in range(total):
        for a in changed:
            idx = torch.tensor(members[a])
            val, j = (c[:, idx] - c[a, idx]).min(1)
            moves[a], arg[a] = val, idx[j]
            moves[a, a] = inf
        changed = set()
        counts = torch.tensor([len(m) for m in members])
        extras_used = int((counts - low).clamp(min=0).sum())
        # the graph: the experts, plus X; a -> X: a takes an extra place, X -> b: b gives an extra place up (and
        # so must push one of its records on)
        w = torch.full((num + 1, num + 1), inf, dtype=torch.float64)
        w[:num, :num] = moves
        w[:num, x] = torch.where((counts >= low) & (counts < high), 0.0, inf)
        w[x, :num] = torch.where(counts > low, 0.0, inf)
        dist = torch.cat([c[:, s], torch.tensor([inf], dtype=torch.float64)])  # cheapest chain to each node
        pred = torch.full((num + 1,), -1, dtype=torch.long)
        for _ in range(num):
            best, via = (dist[:, None] + w).min(0)
            better = best < dist - _EPS
            if not bool(better.any()):
                break
            dist = torch.where(better, best, dist)
            pred = torch.where(better, via, pred)
        ends = [e for e in range(num) if counts[e] < low] + ([x] if extras_used < extra else [])
        node = min(ends, key=lambda e: (float(dist[e]), e))
        seen = {node}
        while int(pred[node]) >= 0:
            a = int(pred[node])
            if a in seen:  # only a negative cycle could do this, and an optimal partial assignment has none
                raise RuntimeError("balanced_assignment: cycle in the shortest-path tree")
            if x not in (a, node):
                r = int(arg[a, node])
                members[a].remove(r)
                members[node].append(r)
                bucket[r] = node
                changed.update((a, node))
            seen.add(a)
            node = a
        members[node].append(s)
        bucket[s] = node
        changed.add(node)
    return bucket


def random_assignment(records: int, experts: int, seed: int) -> torch.Tensor:
    """`[S]` a seeded balanced assignment that ignores the data: the k-th record of a random order goes to
    expert k mod E."""
    order = torch.randperm(records, generator=torch.Generator().manual_seed(seed))
    bucket = torch.empty(records, dtype=torch.long)
    bucket[order] = torch.arange(records) % experts
    return bucket


def assign(nll: torch.Tensor, bucketing: str, how: str = "margin", seed: int = 0,
           parts: tuple[int, ...] | None = None, min_share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(buckets [S] int64, normalised scores [E, S] or None)` for `nll [E, S]`.

    `parts`: sizes of consecutive slices of the records (training part, held-out part) assigned separately for
    `balanced` and `random`; the normalisation uses every record of an expert's row. `seed`: `random` only.
    `min_share`: `balanced` only, the bounds of `quotas`.
    """
    num, total = nll.shape
    parts = parts or (total,)
    if sum(parts) != total:
        raise ValueError(f"parts {parts} do not add up to {total} records")
    if bucketing == "argmin":
        return nll.argmin(0), None  # the first lowest on ties
    scores = normalise(nll, how) if bucketing == "balanced" else None
    out, start = [], 0
    for k, size in enumerate(parts):
        if bucketing == "balanced":
            out.append(balanced_assignment(scores[:, start:start + size], *quotas(size, num, min_share)))
        elif bucketing == "random":
            out.append(random_assignment(size, num, seed + k))
        else:
            raise ValueError(f"unknown bucketing {bucketing!r}")
        start += size
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long), scores
