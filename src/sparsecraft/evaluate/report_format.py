"""How numbers read in the comparison report: counts, bytes, losses, rates, scores, percentages, durations,
and a group's `mean ± std` over its seeds. Every formatter writes `–` for a missing value (None)."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def fmt_count(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for div, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def fmt_rate(v: float | None) -> str:
    return "–" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def fmt_score(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def fmt_pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.3g}%"


def fmt_seconds(v: float | None) -> str:
    if v is None:
        return "–"
    if v < 10:
        return f"{v:.1f} s"
    return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"


def fmt_group(values: list[float], fmt: Callable[[float | None], str], n: int) -> str:
    """`mean ± std` over seeds (a single value as itself; `(k of n)` when some runs lack it)."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    # equal values (parameter counts across seeds) need no ± 0
    text = fmt(mean) if std is None or max(values) == min(values) else f"{fmt(mean)} ± {fmt(std)}"
    return text if len(values) == n else f"{text} ({len(values)} of {n})"
