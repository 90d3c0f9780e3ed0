"""One report from several training runs: methods side by side, with their costs, losses, scores and plots.

A run directory is what `sparsecraft train` leaves: `recipe.json`, `summary.json`, `metrics.jsonl`, and
optionally `eval/results.json` (benchmarks), `eval/quick.json` (held-out loss per source) and `routes/` (from
`sparsecraft routes`). Any of them may be missing (an unfinished run, a run never evaluated): the report shows
what there is and says what is not. Runs whose recipes differ only in `train.seed` form one group, reported
as mean ± standard deviation over the seeds as well as run by run.

    write_report(["runs/dense", "runs/pesc-s0", "runs/pesc-s1"], "runs/report", title="PESC vs dense")
    # -> runs/report/report.md (+ PNGs and their CSVs beside it) and runs/report/report.html (self-contained)
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .plots import (
    LINESTYLES,
    PALETTE,
    atomic_write,
    plot_domain_share,
    plot_load_heatmap,
    plot_loss_curves,
    plot_router_curves,
    read_metrics,
    write_json,
)
from .routes import ROUTES_JSON, RoutingStats

RUN_FILES = ("summary.json", "metrics.jsonl", "recipe.json")
# recipe fields that do not make two runs different experiments
_NOT_THE_EXPERIMENT = ("output_dir", "train.seed", "logging", "checkpoint")
METHOD_ORDER = {"dense": 0, "upcycle": 1, "pesc": 2, "upit": 3}


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """What one run directory holds. Missing or unreadable files leave their field empty and add a note."""

    path: Path
    name: str
    recipe: dict | None = None
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    benchmarks: dict[str, float] = field(default_factory=dict)  # "task/metric" -> value
    quick: dict | None = None
    routes: RoutingStats | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or (self.recipe or {}).get("method") or "unknown")

    @property
    def seed(self) -> int | None:
        seed = ((self.recipe or {}).get("train") or {}).get("seed")
        return seed if isinstance(seed, int) else None

    def value(self, key: str) -> float | None:
        """A number from the summary, else worked out from the metrics log (or quick eval) where possible."""
        v = _number(self.summary.get(key))
        if v is not None:
            return v
        train = [r for r in self.metrics if _number(r.get("loss")) is not None]
        if key == "final_loss" and train:
            return _number(train[-1]["loss"])
        if key == "first_loss" and train:
            return _number(train[0]["loss"])
        if key == "eval_loss":
            # only the training's own held-out evaluation: the quick eval may be on other data and has its
            # own table, so it must not enter a mean over seeds here
            evals = [r for r in self.metrics if _number(r.get("eval_loss")) is not None and r.get("step")]
            return _number(evals[-1]["eval_loss"]) if evals else None
        if key == "initial_eval_loss":
            first = [r for r in self.metrics if r.get("step") == 0 and _number(r.get("eval_loss")) is not None]
            return _number(first[0]["eval_loss"]) if first else None
        if key == "steps" and train:
            return _number(train[-1].get("step"))
        return None

    def eval_sources(self) -> dict[str, float]:
        """Held-out loss per source from the training's final evaluation (the quick eval has its own table)."""
        found = {k.split("/", 1)[1]: v for k, v in self.summary.items()
                 if k.startswith("eval_loss/") and _number(v) is not None}
        return found


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _read_json(path: Path, notes: list[str], what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{what} unreadable ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        notes.append(f"{what} is not a JSON object")
        return None
    return data


def _benchmarks(results: dict | None) -> dict[str, float]:
    """`{"tasks": {task: {metric: value}}, "primary_metric": {task: metric}}` -> `{"task/metric": value}`:
    a task's primary metric when one is named, else all its metrics; numbers only, standard errors left out."""
    out = {}
    primary = (results or {}).get("primary_metric") or {}
    for task, metrics in ((results or {}).get("tasks") or {}).items():
        if not isinstance(metrics, dict):
            continue
        for metric, value in metrics.items():
            if "stderr" in str(metric) or _number(value) is None:
                continue
            if isinstance(primary, dict) and primary.get(task) in metrics and metric != primary[task]:
                continue
            out[f"{task}/{str(metric).removesuffix(',none')}"] = float(value)
    return out


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read a run directory. ConfigError when it does not exist or holds none of summary/metrics/recipe."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run directory not found: {path}")
    if not path.is_dir():
        raise ConfigError(f"not a run directory: {path}")
    if not any((path / f).is_file() for f in RUN_FILES):
        raise ConfigError(f"{path} is not a training run (none of {', '.join(RUN_FILES)})")
    run = Run(path=path, name=name or path.name)
    run.recipe = _read_json(path / "recipe.json", run.notes, "recipe.json")
    run.summary = _read_json(path / "summary.json", run.notes, "summary.json") or {}
    run.metrics = read_metrics(path / "metrics.jsonl")
    if not (path / "summary.json").is_file():
        run.notes.append("no summary.json (unfinished run?): losses taken from metrics.jsonl")
    if not (path / "recipe.json").is_file():
        run.notes.append("no recipe.json: seed unknown, not grouped with other runs")
    if not (path / "metrics.jsonl").is_file():
        run.notes.append("no metrics.jsonl: no loss curve")
    run.benchmarks = _benchmarks(_read_json(path / "eval" / "results.json", run.notes, "eval/results.json"))
    run.quick = _read_json(path / "eval" / "quick.json", run.notes, "eval/quick.json")
    if (path / "routes" / ROUTES_JSON).is_file():
        try:
            run.routes = RoutingStats.read(path / "routes")
        except ConfigError as exc:
            run.notes.append(f"routes/{ROUTES_JSON}: {exc}")
    for key in ("peak_mem_bytes", "total_params") if run.summary else ():
        if key not in run.summary:
            run.notes.append(f"summary.json has no {key}")
    return run


def expand_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The run directories named; a directory that is not a run but holds runs stands for all of them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not any((p / f).is_file() for f in RUN_FILES):
            children = sorted(c for c in p.iterdir() if c.is_dir() and any((c / f).is_file() for f in RUN_FILES))
            if children:
                out += children
                continue
        out.append(p)
    seen = set()
    for p in out:
        key = os.path.realpath(p)
        if key in seen:
            raise ConfigError(f"run directory given twice: {p}")
        seen.add(key)
    return out


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory names, with parents added (then a number) until every run has its own."""
    names = [p.name or str(p) for p in paths]
    for depth in (2, 3):
        clash = {n for n in names if names.count(n) > 1}
        names = ["/".join(p.resolve().parts[-depth:]) if n in clash else n for p, n in zip(paths, names)]
    counts: dict[str, int] = {}
    out = []
    for n in names:
        counts[n] = counts.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{counts[n]}")
    return out


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    dirs = expand_run_dirs(paths)
    if not dirs:
        raise ConfigError("no run directory given")
    return [load_run(p, n) for p, n in zip(dirs, _unique_names(dirs))]


# ---------------------------------------------------------------------------------------------- groups


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def _experiment(recipe: dict) -> dict:
    flat = _flatten(recipe)
    return {k: v for k, v in flat.items()
            if not any(k == x or k.startswith(x + ".") for x in _NOT_THE_EXPERIMENT)}


@dataclass
class Group:
    """Runs of one experiment (same recipe but for the seed)."""

    label: str
    method: str
    runs: list[Run]

    def values(self, get: Callable[[Run], float | None]) -> list[float]:
        return [v for v in (get(r) for r in self.runs) if v is not None]


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal recipes except for `train.seed` (and output/logging/checkpoint settings) share a group.
    Groups of one method are labelled by the settings that tell them apart."""
    groups: dict[str, list[Run]] = {}
    experiments: dict[str, dict] = {}
    for run in runs:
        if run.recipe is None:
            key = f"{run.method}|{run.name}"
            experiments[key] = {}
        else:
            exp = _experiment(run.recipe)
            key = json.dumps(exp, sort_keys=True)
            experiments[key] = exp
        groups.setdefault(key, []).append(run)
    out = []
    for key, members in groups.items():
        method = members[0].method
        label = method
        rivals = [k for k, m in groups.items() if m[0].method == method and k != key]
        if rivals:
            mine = experiments[key]
            differing = sorted({k for r in rivals for k in set(mine) | set(experiments[r])
                                if mine.get(k) != experiments[r].get(k) and k != "method"})
            if mine:
                shown = [f"{k}={json.loads(mine[k]) if k in mine else '-'}" for k in differing[:3]]
                label = f"{method} ({', '.join(shown)}{', ...' if len(differing) > 3 else ''})" if shown else method
            else:
                label = f"{method} ({members[0].name})"
        members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.name))
        out.append(Group(label, method, members))
    out.sort(key=lambda g: (METHOD_ORDER.get(g.method, 9), g.label))
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


# ---------------------------------------------------------------------------------------------- formatting


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


# ---------------------------------------------------------------------------------------------- report model


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] | None = None  # right-aligned columns


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Tables, Images


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


def _groups_table(groups: list[Group]) -> Table:
    names, columns = _metric_columns()
    rows = []
    for g in groups:
        seeds = [r.seed for r in g.runs]
        seed_text = ", ".join("?" if s is None else str(s) for s in seeds)
        rows.append([g.label, f"{len(g.runs)} ({seed_text})"]
                    + [fmt_group(g.values(get), fmt, len(g.runs)) for _, get, fmt in columns])
    return Table(["method", "runs (seeds)"] + names, rows, [False, False] + [True] * len(names))


def _runs_table(runs: list[Run]) -> Table:
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


def _by_key_table(runs: list[Run], groups: list[Group], keys: list[str], get: Callable[[Run, str], float | None],
                  fmt: Callable[[float | None], str]) -> Table:
    """Rows: each run, then each multi-run group's mean ± std; columns: `keys`."""
    rows = [[r.name, r.method] + [fmt(get(r, k)) for k in keys] for r in runs]
    for g in groups:
        if len(g.runs) > 1:
            rows.append([f"**{g.label}** (mean ± std)", g.method]
                        + [fmt_group(g.values(lambda r, k=k: get(r, k)), fmt, len(g.runs)) for k in keys])
    return Table(["run", "method"] + keys, rows, [False, False] + [True] * len(keys))


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
    side.blocks.append(_groups_table(groups))
    sections.append(side)

    each = Section("Runs")
    each.blocks.append(_runs_table(runs))
    sections.append(each)

    sources = sorted({s for r in runs for s in r.eval_sources()})
    if sources:
        per = Section("Held-out loss per source")
        per.blocks.append(_by_key_table(runs, groups, sources, lambda r, k: _number(r.eval_sources().get(k)),
                                        fmt_loss))
        sections.append(per)

    quick = [r for r in runs if r.quick]
    if quick:
        names = sorted({s for r in quick for s in (r.quick.get("sources") or {})})
        section = Section("Quick evaluation (perplexity per source)")

        def perplexity(r: Run, k: str) -> float | None:
            entry = ((r.quick or {}).get("sources") or {}).get(k)
            return _number(entry.get("perplexity")) if isinstance(entry, dict) else None

        section.blocks.append(_by_key_table(runs, groups, names, perplexity, fmt_score))
        sections.append(section)

    tasks = sorted({k for r in runs for k in r.benchmarks})
    if tasks:
        bench = Section("Benchmarks")
        bench.blocks.append(_by_key_table(runs, groups, tasks, lambda r, k: r.benchmarks.get(k), fmt_score))
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
            "routes alike).")
        rows = []
        for r in routed:
            st = r.routes
            rows.append([r.name, st.method, str(st.tokens), ", ".join(st.sources) or "–",
                         f"{float(st.router_entropy().mean()):.3f} / {math.log(st.num_experts):.3f}",
                         f"{float(st.load_entropy().mean()):.3f}", f"{float(st.load_imbalance().mean()):.2f}",
                         f"{float(st.specialisation().mean()):.3f}"])
        section.blocks.append(Table(["run", "method", "tokens", "sources", "router entropy / max",
                                     "load entropy", "imbalance", "specialisation"], rows,
                                    [False, False, True, False, True, True, True, True]))
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


# ---------------------------------------------------------------------------------------------- rendering


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    lines = []
    for i, section in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                align = block.numeric or [False] * len(block.header)
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---:" if a else "---" for a in align) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                lines.append(f"![{block.caption}]({block.path.name})")
                lines.append("")
                lines.append(f"*{block.caption}*")
            else:
                lines.append(str(block))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; }
th { background: #f3f5f7; text-align: left; }
td:first-child { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
code { background: #f3f5f7; padding: 0 3px; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report's text uses: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_html(sections: list[Section]) -> str:
    """A self-contained page: CSS inline, images as base64 data URIs."""
    title = sections[0].title if sections else "report"
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>"]
    for i, section in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        parts.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        for block in section.blocks:
            if isinstance(block, Table):
                align = block.numeric or [False] * len(block.header)
                parts.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header)
                             + "</tr></thead><tbody>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td class=\"num\">{_inline(c)}</td>" if a else
                                                  f"<td>{_inline(c)}</td>" for c, a in zip(row, align)) + "</tr>")
                parts.append("</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt=\"{html.escape(block.caption)}\" src=\"data:image/png;base64,"
                             f"{data}\"><figcaption>{_inline(block.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{_inline(str(block))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
