"""The comparison report's tables of runs and groups: costs, losses, and any per-key numbers.

One row per run, or per group with `mean ± std` over its seeds; cells already formatted as text
(`report_format`), ready for `report_doc.Table`.
"""

from __future__ import annotations

from collections.abc import Callable

from .report_doc import Table
from .report_format import fmt_bytes, fmt_count, fmt_group, fmt_loss, fmt_pct, fmt_rate, fmt_seconds
from .run_dirs import Run
from .run_groups import Group


def _metric_columns() -> tuple[list[str], list[tuple[str, Callable, Callable]]]:
    """The columns shared by the per-run and per-group tables: (header, getter, formatter)."""
    def ratio(r: Run) -> float | None:
        t, n = r.value("trainable_params"), r.value("total_params")
        return t / n if t is not None and n else None

    columns = [
        ("trainable", lambda r: r.value("trainable_params"), fmt_count),
        ("total params", lambda r: r.value("total_params"), fmt_count),
        ("trainable %", ratio, fmt_pct),
        ("tokens/s", lambda r: r.value("tokens_per_s"), fmt_rate),
        ("peak memory", lambda r: r.value("peak_mem_bytes"), fmt_bytes),
        ("train loss", lambda r: r.value("final_loss"), fmt_loss),
        ("held-out loss", lambda r: r.value("eval_loss"), fmt_loss),
    ]
    return [c[0] for c in columns], columns


def groups_table(groups: list[Group]) -> Table:
    """Methods side by side: one row per group, each metric as mean ± std over its runs."""
    names, columns = _metric_columns()
    rows = []
    for g in groups:
        seeds = [r.seed for r in g.runs]
        seed_text = ", ".join("?" if s is None else str(s) for s in seeds)
        rows.append([g.label, f"{len(g.runs)} ({seed_text})"]
                    + [fmt_group(g.values(get), fmt, len(g.runs)) for _, get, fmt in columns])
    return Table(["method", "runs (seeds)"] + names, rows, [False, False] + [True] * len(names))


def runs_table(runs: list[Run]) -> Table:
    """One row per run: its seed, steps, train time, the metrics, and its losses before → after."""
    names, columns = _metric_columns()
    rows = []
    for r in runs:
        before, after = r.value("first_loss"), r.value("final_loss")
        rows.append([r.name, r.method, "?" if r.seed is None else str(r.seed), fmt_count(r.value("steps")),
                     fmt_seconds(r.value("train_seconds"))]
                    + [fmt(get(r)) for _, get, fmt in columns]
                    + [f"{fmt_loss(before)} → {fmt_loss(after)}" if before is not None else "–",
                       f"{fmt_loss(r.value('initial_eval_loss'))} → {fmt_loss(r.value('eval_loss'))}"
                       if r.value("initial_eval_loss") is not None else "–"])
    header = ["run", "method", "seed", "steps", "train time"] + names + ["train loss first → final",
                                                                         "held-out before → after"]
    return Table(header, rows, [False, False, True, True, True] + [True] * len(names) + [True, True])


def by_key_table(runs: list[Run], groups: list[Group], keys: list[str], get: Callable[[Run, str], float | None],
                 fmt: Callable[[float | None], str]) -> Table:
    """Rows: each run, then each multi-run group's mean ± std; columns: `keys`."""
    rows = [[r.name, r.method] + [fmt(get(r, k)) for k in keys] for r in runs]
    for g in groups:
        if len(g.runs) > 1:
            rows.append([f"**{g.label}** (mean ± std)", g.method]
                        + [fmt_group(g.values(lambda r, k=k: get(r, k)), fmt, len(g.runs)) for k in keys])
    return Table(["run", "method"] + keys, rows, [False, False] + [True] * len(keys))
