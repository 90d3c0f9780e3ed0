"""Reading training run directories into `Run`s: recipe, summary, metrics log, evaluations and routing.

A run directory is what `sparsecraft train` leaves: `recipe.json`, `summary.json`, `metrics.jsonl`, and
optionally `eval/results.json` (benchmarks), `eval/quick.json` (held-out loss per source) and `routes/` (from
`sparsecraft routes`). Further evaluations of the same run may sit beside `eval/` as `eval-NAME/` (another data
set, another prompt setting): their tasks and quick sources are read too, a source named again in a later folder
shown as `NAME:source`. Any of them may be missing (an unfinished run, a run never evaluated): the `Run` keeps
what there is and notes what is not.

    runs = load_runs(["runs/dense", "runs/pesc-s0", "runs/pesc-s1"])
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .plots import read_metrics
from .route_stats import ROUTES_JSON, RoutingStats

RUN_FILES = ("summary.json", "metrics.jsonl", "recipe.json")
# An UpIT pipeline folder (`sparsecraft upit`) holds its resolved config here; its trained MoE is `upcycle/`.
UPIT_CONFIG = "upit.json"
UPIT_RUN = "upcycle"


@dataclass
class Run:
    """What one run directory holds. Missing or unreadable files leave their field empty and add a note."""

    path: Path
    name: str
    recipe: dict | None = None
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    benchmarks: dict[str, float] = field(default_factory=dict)  # "task/metric" -> value
    headlines: dict[str, str] = field(default_factory=dict)  # task -> its "task/metric" key in `benchmarks`
    not_run: dict[str, str] = field(default_factory=dict)  # benchmark tasks asked for that could not run
    quick: dict | None = None
    routes: RoutingStats | None = None
    pipeline: dict | None = None  # the UpIT config whose post-training stage this run is
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
        v = finite_number(self.summary.get(key))
        if v is not None:
            return v
        train = [r for r in self.metrics if finite_number(r.get("loss")) is not None]
        if key == "final_loss" and train:
            return finite_number(train[-1]["loss"])
        if key == "first_loss" and train:
            return finite_number(train[0]["loss"])
        if key == "eval_loss":
            # only the training's own held-out evaluation: the quick eval may be on other data and has its
            # own table, so it must not enter a mean over seeds here
            evals = [r for r in self.metrics if finite_number(r.get("eval_loss")) is not None and r.get("step")]
            return finite_number(evals[-1]["eval_loss"]) if evals else None
        if key == "initial_eval_loss":
            first = [r for r in self.metrics if r.get("step") == 0 and finite_number(r.get("eval_loss")) is not None]
            return finite_number(first[0]["eval_loss"]) if first else None
        if key == "steps" and train:
            return finite_number(train[-1].get("step"))
        return None

    def eval_sources(self) -> dict[str, float]:
        """Held-out loss per source from the training's final evaluation (the quick eval has its own table)."""
        found = {k.split("/", 1)[1]: v for k, v in self.summary.items()
                 if k.startswith("eval_loss/") and finite_number(v) is not None}
        return found


def finite_number(v: Any) -> float | None:
    """`v` as a float when it is a finite int or float (not a bool); None for anything else."""
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


def _pass_at_family(metric: str) -> str | None:
    """`"pass@5/sampled"` -> `"/sampled"`: the filter part shared by a task's pass@k metrics; None if not pass@k."""
    head, _, rest = str(metric).partition("/")
    return "/" + rest if re.fullmatch(r"pass@\d+", head.split(",")[0]) else None


def _benchmarks(results: dict | None) -> tuple[dict[str, float], dict[str, str]]:
    """`{"tasks": {task: {metric: value}}, "primary_metric": {task: metric}}` -> (`{"task/metric": value}`,
    `{task: "task/metric"}` of its headline). A task's primary metric when one is named (with its pass@k siblings:
    sampled code tasks report pass@1, @5 and @10), else all its metrics; numbers only, standard errors left out."""
    out, headlines = {}, {}
    primary = (results or {}).get("primary_metric") or {}
    for task, metrics in ((results or {}).get("tasks") or {}).items():
        if not isinstance(metrics, dict):
            continue
        named = primary.get(task) if isinstance(primary, dict) and primary.get(task) in metrics else None
        family = _pass_at_family(named) if named else None
        for metric, value in metrics.items():
            if "stderr" in str(metric) or finite_number(value) is None:
                continue
            if named and metric != named and (family is None or _pass_at_family(metric) != family):
                continue
            key = f"{task}/{str(metric).removesuffix(',none')}"
            out[key] = float(value)
            if metric == named or (not named and task not in headlines):
                headlines[task] = key
    return out, headlines


def eval_dirs(path: Path) -> list[Path]:
    """A run's evaluation folders: `eval/` first, then `eval-*/` in name order."""
    extra = sorted(p for p in path.glob("eval-*") if p.is_dir())
    return [path / "eval", *extra]


def _read_evaluations(run: Run) -> None:
    """Benchmarks, tasks not run and quick-eval sources of every evaluation folder, merged."""
    sources: dict[str, Any] = {}
    for folder in eval_dirs(run.path):
        where = folder.name
        results = _read_json(folder / "results.json", run.notes, f"{where}/results.json")
        values, headlines = _benchmarks(results)
        for key, value in values.items():
            run.benchmarks.setdefault(key, value)
        for task, key in headlines.items():
            run.headlines.setdefault(task, key)
        not_run = (results or {}).get("not_run")
        if isinstance(not_run, dict):
            for task, why in not_run.items():
                run.not_run.setdefault(task, why)
        quick = _read_json(folder / "quick.json", run.notes, f"{where}/quick.json")
        for source, entry in ((quick or {}).get("sources") or {}).items():
            label = source if source not in sources else f"{where.removeprefix('eval-')}:{source}"
            sources[label] = entry
    run.quick = {"sources": sources} if sources else None


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
    if _is_pipeline_run(path):
        run.pipeline = _read_json(path.parent / UPIT_CONFIG, run.notes, f"../{UPIT_CONFIG}")
    if not (path / "summary.json").is_file():
        run.notes.append("no summary.json (unfinished run?): losses taken from metrics.jsonl")
    if not (path / "recipe.json").is_file():
        run.notes.append("no recipe.json: seed unknown, not grouped with other runs")
    if not (path / "metrics.jsonl").is_file():
        run.notes.append("no metrics.jsonl: no loss curve")
    _read_evaluations(run)
    if (path / "routes" / ROUTES_JSON).is_file():
        try:
            run.routes = RoutingStats.read(path / "routes")
        except ConfigError as exc:
            run.notes.append(f"routes/{ROUTES_JSON}: {exc}")
    for key in ("peak_mem_bytes", "total_params") if run.summary else ():
        if key not in run.summary:
            run.notes.append(f"summary.json has no {key}")
    return run


def _as_run(path: Path) -> Path:
    """An UpIT pipeline folder stands for its trained MoE (`upcycle/`); any other path for itself."""
    if (path / UPIT_CONFIG).is_file() and (path / UPIT_RUN).is_dir():
        return path / UPIT_RUN
    return path


def _is_pipeline_run(path: Path) -> bool:
    return path.name == UPIT_RUN and (path.parent / UPIT_CONFIG).is_file()


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def expand_run_dirs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The run directories named; a directory that is not a run but holds runs stands for all of them, an UpIT
    pipeline folder for its post-training run."""
    out: list[Path] = []
    for p in map(_as_run, map(Path, paths)):
        if p.is_dir() and not _is_run(p):
            children = sorted(c for c in map(_as_run, p.iterdir()) if _is_run(c))
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
    """Directory names (an UpIT post-training run: its pipeline's), with parents added (then a number) until every
    run has its own."""
    paths = [p.parent if _is_pipeline_run(p) else p for p in paths]
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
    """Every run directory named (see `expand_run_dirs`), each under a name of its own. ConfigError for none."""
    dirs = expand_run_dirs(paths)
    if not dirs:
        raise ConfigError("no run directory given")
    return [load_run(p, n) for p, n in zip(dirs, _unique_names(dirs))]
