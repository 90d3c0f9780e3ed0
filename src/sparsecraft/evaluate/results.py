"""Evaluation results on disk: `results.json` + `results.md` (lm-eval tasks), `quick.json` + `quick.md`.

Shapes other tools read (the comparison report reads `RUN_DIR/eval/`):

    results.json  {"model": str, "tasks": {task: {metric: value}}, "primary_metric": {task: metric},
                   "subtasks": {...same as tasks, for groups' members...}, "settings": {...}}
    quick.json    {"model": str, "sources": {name: {"loss", "perplexity", "tokens", "samples"}},
                   "loss": overall, "perplexity": overall, "tokens": n, "settings": {...}}
    samples/TASK.jsonl   with `--log-samples`: lm-eval's record of every document (prompt, answers, metrics)

Metric names are lm-eval's with the filter after a slash when it is not `none`: `acc`, `acc_norm`,
`acc_stderr`, `exact_match/strict-match`, `pass@1`. Every file is written to a temporary sibling and renamed
into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

RESULTS_JSON, RESULTS_MD, RAW_JSON = "results.json", "results.md", "lm_eval_results.json"
QUICK_JSON, QUICK_MD = "quick.json", "quick.md"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` atomically (see `atomic.atomic_write`)."""
    return atomic_write(path, text)


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str, allow_nan=False) + "\n"


def _number(value: Any) -> float | None:
    """A finite float, or None for lm-eval's placeholders ('N/A', NaN stderr of one sample)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric_name(key: str) -> str:
    """lm-eval's `metric,filter` key → `metric` (filter `none`) or `metric/filter`."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def task_metrics(raw_task: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one task's entry in lm-eval's `results`, renamed (see `metric_name`)."""
    out = {}
    for key, value in raw_task.items():
        if key in ("alias", "name", "sample_len", "samples") or "," not in key:
            continue
        number = _number(value)
        if number is not None:
            out[metric_name(key)] = number
    return out


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The headline metric: the first one that is not a standard error (lm-eval keeps the task's order)."""
    return next((m for m in metrics if "_stderr" not in m), None)


def summarize_lm_eval(raw: dict[str, Any], requested: list[str]) -> dict[str, Any]:
    """Split lm-eval's output into the requested tasks/groups and their members, with settings per task."""
    results = raw.get("results", {})
    tasks = {name: task_metrics(results[name]) for name in requested if name in results}
    subtasks = {name: task_metrics(entry) for name, entry in results.items() if name not in tasks}
    n_shot = raw.get("n-shot", {})
    n_samples = raw.get("n-samples", {})
    return {
        "tasks": tasks,
        "primary_metric": {name: primary_metric(m) for name, m in tasks.items()},
        "subtasks": subtasks,
        "num_fewshot": {name: n_shot[name] for name in (*tasks, *subtasks) if name in n_shot},
        "samples": {name: n_samples[name].get("effective") for name in n_samples},
    }


def write_results(out_dir: str | os.PathLike, model: str, summary: dict[str, Any], settings: dict[str, Any],
                  raw: dict[str, Any] | None = None, not_run: dict[str, str] | None = None) -> Path:
    """Write `results.json`, `results.md` (and lm-eval's own output, without per-sample logs) into `out_dir`.
    `not_run`: tasks asked for that could not run, with the reason (kept in the files, never dropped)."""
    out_dir = Path(out_dir)
    settings = {**settings, "num_fewshot": summary.get("num_fewshot", {}), "samples": summary.get("samples", {})}
    data = {"model": model, "tasks": summary["tasks"], "primary_metric": summary.get("primary_metric", {}),
            "subtasks": summary.get("subtasks", {}), "not_run": dict(not_run or {}), "settings": settings}
    if raw is not None:
        atomic_write_text(out_dir / RAW_JSON, json.dumps({k: v for k, v in raw.items() if k != "samples"},
                                                         indent=2, default=str) + "\n")
    atomic_write_text(out_dir / RESULTS_MD, format_results_table(data) + "\n")
    return atomic_write_text(out_dir / RESULTS_JSON, _json(data))


def write_samples(out_dir: str | os.PathLike, raw: dict[str, Any]) -> list[Path]:
    """lm-eval's per-sample log (`log_samples`) as `samples/TASK.jsonl`: one line per document with its prompt
    (`arguments`), the model's raw answers (`resps`), the filtered ones scored (`filtered_resps`), the target and
    the metrics. Returns the files written."""
    written = []
    for task, samples in sorted((raw.get("samples") or {}).items()):
        lines = [json.dumps(sample, ensure_ascii=False, default=str) for sample in samples]
        written.append(atomic_write_text(Path(out_dir) / "samples" / f"{task}.jsonl", "\n".join(lines) + "\n"))
    return written


def format_results_table(data: dict[str, Any]) -> str:
    """A Markdown table: one row per task and metric (standard errors beside their metric)."""
    shots = data.get("settings", {}).get("num_fewshot", {})
    samples = data.get("settings", {}).get("samples", {})
    lines = [f"Model: `{data['model']}`", "", "| task | n-shot | samples | metric | value | stderr |",
             "|---|---:|---:|---|---:|---:|"]
    for task, metrics in data["tasks"].items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            base, _, filt = metric.partition("/")
            err = metrics.get(f"{base}_stderr" + (f"/{filt}" if filt else ""))
            lines.append(f"| {task} | {shots.get(task, '')} | {samples.get(task) or ''} | {metric} | "
                         f"{value:.4f} | {'' if err is None else f'{err:.4f}'} |")
    for task, why in (data.get("not_run") or {}).items():
        lines.append(f"| {task} | | | not run | | |  ({why})")
    return "\n".join(lines)


def write_quick(out_dir: str | os.PathLike, model: str, quick: dict[str, Any],
                settings: dict[str, Any] | None = None) -> Path:
    """Write `quick.json` and `quick.md` (held-out loss and perplexity per source) into `out_dir`."""
    data = {"model": model, **quick, "settings": settings or {}}
    atomic_write_text(Path(out_dir) / QUICK_MD, format_quick_table(data) + "\n")
    return atomic_write_text(Path(out_dir) / QUICK_JSON, _json(data))


def format_quick_table(data: dict[str, Any]) -> str:
    lines = [f"Model: `{data['model']}`", "", "| source | samples | tokens | loss | perplexity |",
             "|---|---:|---:|---:|---:|"]
    rows = list(data["sources"].items()) + [("all", {k: data.get(k) for k in ("samples", "tokens", "loss",
                                                                              "perplexity")})]
    for name, row in rows:
        ppl, loss = row.get("perplexity"), row.get("loss")
        loss_text = "n/a" if loss is None else f"{loss:.4f}"
        ppl_text = "n/a" if loss is None else ("inf" if ppl is None else f"{ppl:.3f}")
        lines.append(f"| {name} | {row.get('samples', '')} | {row.get('tokens', '')} | {loss_text} | {ppl_text} |")
    return "\n".join(lines)
