"""Mixing sources: how many records each contributes, which ones, and the held-out split. Seeded, deterministic."""

from __future__ import annotations

import math

import numpy as np

from .config import DataSource


def rng_for(seed: int, index: int, purpose: int, *more: int) -> np.random.Generator:
    """An RNG per (seed, source, purpose, ...): one source's draw does not depend on the others'."""
    return np.random.default_rng([seed, index, purpose, *more])


def split_eval(size: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of one source: `round(size * fraction)` held out, at least one when
    `fraction > 0` and the source has two records or more, and never the whole source."""
    n_eval = int(round(size * fraction))
    if fraction > 0 and size >= 2:
        n_eval = min(max(n_eval, 1), size - 1)
    perm = rng.permutation(size)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integer counts proportional to `shares` that add up to exactly `total`."""
    exact = [total * s / sum(shares) for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_counts(sources: list[DataSource], sizes: list[int], total: int | None) -> tuple[list[int], list[str]]:
    """Records to draw from each source, and notes on what could not be honoured.

    `samples` sources get their count; weighted sources share `total` by weight (without `total`: the largest
    total no weighted source must repeat records for); the others are taken whole. Without `replace`, a count
    above the source's size is capped at it, with a note.
    """
    counts = [size for size in sizes]
    notes: list[str] = []
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    if weighted:
        weights = [sources[i].weight for i in weighted]
        if total is None:
            limits = [sizes[i] * sum(weights) / sources[i].weight for i in weighted if not sources[i].replace]
            target = math.floor(min(limits) + 1e-9) if limits else sum(sizes[i] for i in weighted)
        else:
            target = total
        for i, n in zip(weighted, largest_remainder(weights, target)):
            counts[i] = n
    for i, s in enumerate(sources):
        if s.samples is not None:
            counts[i] = s.samples
        if counts[i] > sizes[i] and not s.replace:
            notes.append(f"{s.display_name}: asked for {counts[i]:,} records, has {sizes[i]:,}; took all "
                         "(set replace: true to repeat records)")
            counts[i] = sizes[i]
    return counts, notes


def draw(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into a source of `size`: without replacement up to `size`; beyond, whole copies of the
    source plus a draw without replacement for the remainder (so every record appears ⌊count/size⌋ times or
    once more)."""
    copies, rest = divmod(count, size)
    parts = [np.arange(size)] * copies + [rng.permutation(size)[:rest]]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
