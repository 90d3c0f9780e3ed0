"""Plots of routing statistics and training runs, each written as a PNG with the numbers behind it beside it.

`name.png` always comes with `name.csv` (same stem) holding exactly the values drawn, so a plot can be checked
or redrawn elsewhere. Files are written atomically (temporary sibling, then `os.replace`). Figures are built
on matplotlib's `Figure` with the Agg canvas directly, never through `pyplot`, so nothing changes the global
backend of a program that imports this module and no figure is left open.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
LINESTYLES = ("-", "--", ":", "-.")
DPI = 110


# ---------------------------------------------------------------------------------------------- files



def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV with a header row; floats keep full precision, None and NaN are written as empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row])
    return atomic_write(path, buffer.getvalue())


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON with NaN written as null (strict JSON readers reject NaN)."""
    return atomic_write(path, json.dumps(json_safe(data), indent=2) + "\n")


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, through nested dicts, lists and tuples
    (tuples become lists); anything else is returned as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a run's `metrics.jsonl`; lines cut by a kill or otherwise unreadable are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render a figure to PNG bytes and write them atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return atomic_write(path, buffer.getvalue())


def _csv_beside(png: Path) -> Path:
    return png.with_suffix(".csv")


# ---------------------------------------------------------------------------------------------- routing


def _annotate(ax, values: np.ndarray, fmt: str, threshold: float | None = None) -> None:
    """Write each cell's value into a small heatmap (skipped when there are too many cells to read)."""
    rows, cols = values.shape
    if rows * cols > 160:
        return
    hi = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 0.0
    for i in range(rows):
        for j in range(cols):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            dark = threshold is not None and abs(v) > threshold * hi
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")


def plot_load_heatmap(share: np.ndarray, layers: Sequence[int], path: str | os.PathLike,
                      title: str = "Expert load (share of routed slots)") -> Path:
    """Layer x expert heatmap of `share: [L, E]` (rows sum to 1); writes `path` (PNG) and its CSV.

    The colour scale starts at 0 and the colour bar marks the uniform share 1/E.
    """
    share = np.asarray(share, dtype=float)
    num_layers, num_experts = share.shape
    path = Path(path)
    fig = _figure(max(4.0, 1.0 + 0.45 * num_experts), max(2.6, 1.2 + 0.32 * num_layers))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(float(np.nanmax(share)), 1.0 / num_experts),
                      aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    bar.ax.axhline(1.0 / num_experts, color="white", linewidth=1.5)
    bar.set_label(f"share (uniform = 1/{num_experts})")
    _annotate(ax, share, ".2f", threshold=None)
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_layers), [str(i) for i in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    # the annotations are black: keep them readable on viridis' dark end by a white outline
    for text in ax.texts:
        text.set_path_effects(_outline())
    save_figure(fig, path)
    write_csv(_csv_beside(path), ["layer", "expert", "share"],
              [(layer, e, float(share[i, e])) for i, layer in enumerate(layers) for e in range(num_experts)])
    return path


def _outline():
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=2, foreground="white")]


def plot_domain_share(source_share: dict[str, np.ndarray], layers: Sequence[int], path: str | os.PathLike,
                      title: str = "Which experts each source uses") -> Path:
    """Per-source expert share: grouped bars of the share averaged over layers, then one heatmap per source of
    `share - 1/E` per layer and expert (red: used more than uniform, blue: less).

    `source_share`: `{source: [L, E]}`, each row summing to 1. Writes `path` and its CSV.
    """
    names = list(source_share)
    if not names:
        raise ValueError("plot_domain_share needs at least one source")
    shares = {n: np.asarray(source_share[n], dtype=float) for n in names}
    num_layers, num_experts = shares[names[0]].shape
    uniform = 1.0 / num_experts
    path = Path(path)
    fig = _figure(max(6.0, 2.0 + 2.6 * len(names)), 3.0 + max(2.2, 0.3 * num_layers))
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.0, max(1.0, 0.12 * num_layers)])
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / len(names)
    for s, name in enumerate(names):
        mean = np.nanmean(shares[name], axis=0)
        bars.bar(np.arange(num_experts) + (s - (len(names) - 1) / 2) * width, mean, width,
                 label=name, color=PALETTE[s % len(PALETTE)])
    bars.axhline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform 1/{num_experts}")
    bars.set_xticks(range(num_experts))
    bars.set_xlabel("expert")
    bars.set_ylabel("share (mean over layers)")
    top = max(float(np.nanmax(np.nanmean(shares[n], axis=0))) for n in names)
    bars.set_ylim(0, max(top, uniform) * 1.3)  # headroom: the legend sits above the bars
    bars.legend(fontsize=8, loc="upper center", ncols=min(len(names) + 1, 6), frameon=False)
    bars.set_title(title, fontsize=10)
    deviation = {n: shares[n] - uniform for n in names}
    limit = max(max(float(np.nanmax(np.abs(d))) for d in deviation.values()), 1e-6)
    image = None
    for s, name in enumerate(names):
        ax = fig.add_subplot(grid[1, s])
        image = ax.imshow(deviation[name], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(num_experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(num_layers), [str(i) for i in layers] if s == 0 else [""] * num_layers)
        if s == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=fig.axes[1:], label="share - uniform")
    save_figure(fig, path)
    rows = []
    for name in names:
        for i, layer in enumerate(layers):
            rows += [(name, layer, e, float(shares[name][i, e]), float(deviation[name][i, e]))
                     for e in range(num_experts)]
        rows += [(name, "mean", e, float(np.nanmean(shares[name][:, e])), float(np.nanmean(deviation[name][:, e])))
                 for e in range(num_experts)]
    write_csv(_csv_beside(path), ["source", "layer", "expert", "share", "share_minus_uniform"], rows)
    return path


def plot_coselection(fraction: np.ndarray, path: str | os.PathLike,
                     title: str = "Experts chosen together\n(fraction of tokens, mean over layers)") -> Path:
    """`fraction: [E, E]`, entry (i, j) the fraction of tokens whose chosen experts include both i and j (the
    diagonal: tokens choosing i). Writes `path` and its CSV (all entries).

    The colours show the pairs only (the diagonal is grey with its value written in), so a popular expert's
    load does not wash out the pair structure.
    """
    import matplotlib

    fraction = np.asarray(fraction, dtype=float)
    num_experts = fraction.shape[0]
    path = Path(path)
    pairs = fraction.copy()
    np.fill_diagonal(pairs, np.nan)
    fig = _figure(max(4.2, 1.4 + 0.45 * num_experts), max(3.6, 1.1 + 0.42 * num_experts))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#d9d9d9")
    top = float(np.nanmax(pairs)) if np.isfinite(pairs).any() else 0.0
    image = ax.imshow(pairs, cmap=cmap, vmin=0.0, vmax=max(top, 1e-9), interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of tokens (pairs)")
    _annotate(ax, fraction, ".2f")
    for text in ax.texts:
        text.set_path_effects(_outline())
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(num_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    write_csv(_csv_beside(path), ["expert_i", "expert_j", "fraction"],
              [(i, j, float(fraction[i, j])) for i in range(num_experts) for j in range(num_experts)])
    return path


# ---------------------------------------------------------------------------------------------- training runs


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under `key`."""
    steps, values = [], []
    for r in records:
        v, step = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                isinstance(step, (int, float)):
            steps.append(float(step))
            values.append(float(v))
    return steps, values


def _style(name: str, index: int, styles: dict | None) -> tuple[str, str]:
    if styles and name in styles:
        return styles[name]
    return PALETTE[index % len(PALETTE)], "-"


def _run_legend(fig, entries: list[tuple[str, str, str]]) -> None:
    """One legend entry per run (colour and line style as drawn), outside the axes on the right."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linestyle=ls, linewidth=1.6) for _, c, ls in entries]
    fig.legend(handles, [name for name, _, _ in entries], loc="outside right upper", fontsize=8,
               title="run", title_fontsize=8)


def plot_loss_curves(runs: dict[str, list[dict]], path: str | os.PathLike, styles: dict | None = None,
                     title: str = "Loss") -> Path | None:
    """Training loss (left) and held-out loss (right, at each evaluation) of several runs, one line per run.

    `runs`: `{run name: metrics.jsonl records}`; `styles`: `{run name: (colour, linestyle)}` (runs of one method
    share a colour). Returns None (and writes nothing) when no run has a loss.
    """
    rows, entries = [], []
    fig = _figure(11.0, 4.2)
    train_ax, eval_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for index, (name, records) in enumerate(runs.items()):
        color, linestyle = _style(name, index, styles)
        steps, loss = _series([r for r in records if "loss" in r], "loss")
        eval_steps, eval_loss = _series(records, "eval_loss")
        if steps:
            train_ax.plot(steps, loss, color=color, linestyle=linestyle, linewidth=1.3)
        if eval_steps:
            eval_ax.plot(eval_steps, eval_loss, color=color, linestyle=linestyle, marker="o", markersize=4,
                         linewidth=1.3)
        if steps or eval_steps:
            entries.append((name, color, linestyle))
        rows += [(name, "train", int(s), v) for s, v in zip(steps, loss)]
        rows += [(name, "held-out", int(s), v) for s, v in zip(eval_steps, eval_loss)]
    if not entries:
        return None
    for ax, label in ((train_ax, "training loss"), (eval_ax, "held-out loss")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{label} (token mean)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _finish_run_figure(fig, entries, title, path, ["run", "split", "step", "loss"], rows)


def plot_router_curves(runs: dict[str, list[dict]], path: str | os.PathLike, styles: dict | None = None,
                       title: str = "Router balance during training") -> Path | None:
    """Load-balancing (aux) loss and load imbalance (mean over layers of max/mean expert load; 1 = balanced)
    per step, one line per run. Returns None (and writes nothing) for runs without router metrics (dense)."""
    keys = (("aux_loss", "aux loss (balance, without coefficient)"), ("load_imbalance", "load imbalance max/mean"))
    fig = _figure(11.0, 3.8)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    rows, entries = [], []
    for index, (name, records) in enumerate(runs.items()):
        color, linestyle = _style(name, index, styles)
        drawn = False
        for ax, (key, _) in zip(axes, keys):
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, color=color, linestyle=linestyle, linewidth=1.3)
                drawn = True
                rows += [(name, key, int(s), v) for s, v in zip(steps, values)]
        if drawn:
            entries.append((name, color, linestyle))
    if not entries:
        return None
    for ax, (key, label) in zip(axes, keys):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        if key == "load_imbalance":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
    return _finish_run_figure(fig, entries, title, path, ["run", "metric", "step", "value"], rows)


def _finish_run_figure(fig, entries: list, title: str, path: str | os.PathLike, header: list[str],
                       rows: list) -> Path:
    """Legend of the runs, title, the PNG and the CSV of its numbers beside it."""
    _run_legend(fig, entries)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    save_figure(fig, path)
    write_csv(_csv_beside(path), header, rows)
    return path
