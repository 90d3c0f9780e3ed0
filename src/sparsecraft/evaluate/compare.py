"""One report from several training runs: methods side by side, with their costs, losses, scores and plots.

This module assembles the report and writes it: the runs are read by `run_dirs` and grouped by `run_groups`
(runs whose recipes differ only in `train.seed` form one group, reported as mean ± standard deviation over the
seeds as well as run by run); `build_report` lays out the sections (tables from `report_tables`, plots from
`plots`), which `report_markdown` and `report_html` render. Missing files in a run directory (an unfinished
run, a run never evaluated) leave the report showing what there is and saying what is not.

    write_report(["runs/dense", "runs/pesc-s0", "runs/pesc-s1"], "runs/report", title="PESC vs dense")
    # -> runs/report/report.md (+ PNGs and their CSVs beside it) and runs/report/report.html (self-contained)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .plots import (
    LINESTYLES,
    PALETTE,
    atomic_write,
    plot_domain_share,
    plot_load_heatmap,
    plot_loss_curves,
    plot_router_curves,
    write_json,
)
from .report_doc import Image, Section, Table
from .report_format import fmt_loss, fmt_score
from .report_html import render_html
from .report_markdown import render_markdown
from .report_tables import by_key_table, groups_table, runs_table
from .run_dirs import Run, finite_number, load_runs
from .run_groups import group_runs
from .suites import PAPER_CATEGORIES, category_scores

PAPER_TASKS = {t for tasks in PAPER_CATEGORIES.values() for t in tasks}


def task_of(key: str) -> str:
    """`"gsm8k/exact_match"` -> `"gsm8k"` (the benchmark keys of a run are task/metric)."""
    return key.split("/", 1)[0]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def build_report(runs: list[Run], out_dir: str | os.PathLike, title: str) -> list[Section]:
    """Write the plots (and their CSVs) into `out_dir` and return the report's sections."""
    out = Path(out_dir)
    groups = group_runs(runs)
    styles = {}
    for gi, g in enumerate(groups):
        for ri, r in enumerate(g.runs):
            styles[r.name] = (PALETTE[gi % len(PALETTE)], LINESTYLES[ri % len(LINESTYLES)])
    sections = []

    intro = Section(title)
    intro.blocks.append(
        f"{len(runs)} runs in {len(groups)} groups: "
        + "; ".join(f"{g.label}: {', '.join(r.name for r in g.runs)}" for g in groups)
        + ". Groups are runs whose recipes differ only in `train.seed`; their rows show mean ± standard "
          "deviation over the seeds. Losses are token means; held-out loss is the final evaluation on the "
          "held-out split.")
    sections.append(intro)

    side = Section("Methods side by side")
    side.blocks.append(groups_table(groups))
    sections.append(side)

    each = Section("Runs")
    each.blocks.append(runs_table(runs))
    sections.append(each)

    sources = sorted({s for r in runs for s in r.eval_sources()})
    if sources:
        per = Section("Held-out loss per source")
        per.blocks.append(by_key_table(runs, groups, sources,
                                       lambda r, k: finite_number(r.eval_sources().get(k)), fmt_loss))
        sections.append(per)

    quick = [r for r in runs if r.quick]
    if quick:
        names = sorted({s for r in quick for s in (r.quick.get("sources") or {})})
        section = Section("Quick evaluation (perplexity per source)")

        def perplexity(r: Run, k: str) -> float | None:
            entry = ((r.quick or {}).get("sources") or {}).get(k)
            return finite_number(entry.get("perplexity")) if isinstance(entry, dict) else None

        section.blocks.append(by_key_table(runs, groups, names, perplexity, fmt_score))
        sections.append(section)

    tasks = sorted({k for r in runs for k in r.benchmarks})
    if tasks:
        bench = Section("Benchmarks")
        bench.blocks.append(by_key_table(runs, groups, tasks, lambda r, k: r.benchmarks.get(k), fmt_score))
        if any(task_of(k) in PAPER_TASKS for k in tasks):
            bench.blocks.append("The paper's categories (Table 2 of arXiv 2401.02731): each the mean of its tasks "
                                "that ran, the average the mean of the categories; tasks not run are listed per run.")
            names = [*PAPER_CATEGORIES, "Average"]
            bench.blocks.append(by_key_table(runs, groups, names, lambda r, k: category_scores(
                {task: r.benchmarks[key] for task, key in r.headlines.items()}).get(k), fmt_score))
        missing = [(r.name, ", ".join(sorted(r.not_run))) for r in runs if r.not_run]
        if missing:
            bench.blocks.append(Table(["run", "tasks not run"], [list(m) for m in missing], [False, False]))
        sections.append(bench)

    curves = Section("Loss curves")
    loss_png = plot_loss_curves({r.name: r.metrics for r in runs}, out / "loss_curves.png", styles,
                                "Training and held-out loss")
    if loss_png is not None:
        curves.blocks.append(Image(loss_png, "Training loss per optimizer step (left) and held-out loss at each "
                                             "evaluation (right); one colour per group, one line style per seed."))
    else:
        curves.blocks.append("No run has a loss in its metrics.jsonl.")
    router_png = plot_router_curves({r.name: r.metrics for r in runs}, out / "router_curves.png", styles)
    if router_png is not None:
        curves.blocks.append(Image(router_png, "Load-balancing loss and load imbalance (max / mean expert load "
                                               "over the batch, mean over layers; 1 = balanced)."))
    sections.append(curves)

    routed = [r for r in runs if r.routes is not None]
    if routed:
        section = Section("Routing")
        section.blocks.append(
            "From `sparsecraft routes`: router entropy is the mean per-token entropy of the softmax over all "
            "experts (nats; log E = uniform), load entropy that of the expert shares, specialisation the mean "
            "total-variation distance between each source's expert shares and the overall ones (0 = every source "
            "routes alike), domain MI the mutual information between a slot's domain and its expert over the "
            "domain's entropy, I(D; X) / H(D) (0 = the expert says nothing of the domain, 1 = it tells it; "
            "docs/routing.md).")
        rows = []
        for r in routed:
            st = r.routes
            rows.append([r.name, st.method, str(st.tokens), ", ".join(st.sources) or "–",
                         f"{float(st.router_entropy().mean()):.3f} / {math.log(st.num_experts):.3f}",
                         f"{float(st.load_entropy().mean()):.3f}", f"{float(st.load_imbalance().mean()):.2f}",
                         f"{float(st.specialisation().mean()):.3f}", f"{float(st.domain_mi().mean()):.3f}"])
        section.blocks.append(Table(["run", "method", "tokens", "sources", "router entropy / max",
                                     "load entropy", "imbalance", "specialisation", "domain MI"], rows,
                                    [False, False, True, False, True, True, True, True, True]))
        for r in routed:
            st = r.routes
            slug = _slug(r.name)
            section.blocks.append(Image(plot_load_heatmap(st.token_share().numpy(), st.layers,
                                                          out / f"routes_{slug}_load.png",
                                                          f"{r.name}: expert load (share of routed slots)"),
                                        f"{r.name}: share of routed slots per layer and expert."))
            if st.sources:
                share = st.source_share()
                png = plot_domain_share({n: share[s].numpy() for s, n in enumerate(st.sources)}, st.layers,
                                        out / f"routes_{slug}_sources.png", f"{r.name}: which experts each source uses")
                section.blocks.append(Image(png, f"{r.name}: expert share per source (bars: mean over layers; "
                                                 "maps: share minus uniform per layer)."))
        sections.append(section)

    noted = [r for r in runs if r.notes]
    if noted:
        notes = Section("Notes")
        notes.blocks.append(Table(["run", "directory", "note"],
                                  [[r.name, str(r.path), "; ".join(r.notes)] for r in noted]))
        sections.append(notes)
    return sections


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 title: str = "sparsecraft run comparison") -> dict[str, Path]:
    """Read the runs, write `report.md` with its PNGs (and CSVs) and a self-contained `report.html` into
    `out_dir`, plus `runs.json` with the numbers of the tables. Returns the written report paths."""
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_report(runs, out, title)
    numbers = {
        "title": title,
        "runs": [{"name": r.name, "path": str(r.path), "method": r.method, "seed": r.seed,
                  "summary": r.summary, "benchmarks": r.benchmarks, "eval_sources": r.eval_sources(),
                  "notes": r.notes} for r in runs],
        "groups": [{"label": g.label, "method": g.method, "runs": [r.name for r in g.runs]}
                   for g in group_runs(runs)],
    }
    paths = {"json": write_json(out / "runs.json", numbers)}
    paths["markdown"] = atomic_write(out / "report.md", render_markdown(sections))
    paths["html"] = atomic_write(out / "report.html", render_html(sections))
    return paths
