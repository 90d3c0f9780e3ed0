"""Score kept HumanEval answers again with the current code extraction and execution, without generating anew.

    python scripts/rescore_humaneval.py EVAL_DIR...

Each EVAL_DIR is an evaluation folder as `sparsecraft eval --log-samples` leaves it, or as
`scripts/keep_results.py` keeps it: `results.json` and the answers in `samples.jsonl.gz` (or `samples/*.jsonl`).
Every answer is taken as code (`completion_as_code` for the chat tasks, as written for the plain ones) and run
against its problem's tests again; the per-problem scores in the samples file and the task's means and standard
errors in `results.json` are replaced, the old means kept under `before_rescoring`, and `settings.rescored`
names the commit that scored them. Runs model-written code, as the evaluation did: only on answers you trust to
run here.
"""

from __future__ import annotations

import gzip
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from sparsecraft.atomic import atomic_write
from sparsecraft.evaluate import humaneval

CHAT_TASKS = ("sc_humaneval_chat", "sc_humaneval_chat_sampled", "sc_indep_code")


def read_samples(folder: Path) -> tuple[list[dict], Path]:
    """The logged records of one evaluation folder and the file they came from."""
    kept = folder / "samples.jsonl.gz"
    if kept.is_file():
        with gzip.open(kept, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()], kept
    files = sorted((folder / "samples").glob("*.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"error: {folder} has no samples.jsonl.gz and not exactly one samples/*.jsonl")
    return [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines() if line.strip()], files[0]


def score(record: dict, chat: bool) -> dict[str, float]:
    """pass@1 of a greedy answer, or pass@1/5/10 of a problem's sampled answers, scored now."""
    answers = record["filtered_resps"][0]
    doc = record["doc"]
    if isinstance(answers, list):
        programs = [humaneval.completion_as_code(doc, a) if chat else a for a in answers]
        passed = sum(humaneval.check_completion(doc, p).passed for p in programs)
        return {f"pass@{k}": humaneval.pass_at_k(len(programs), passed, k)
                for k in humaneval.SAMPLED_K if k <= len(programs)}
    program = humaneval.completion_as_code(doc, answers) if chat else answers
    return {"pass@1": float(humaneval.check_completion(doc, program).passed)}


def rescore(folder: Path, task: str, workers: int = 2) -> dict[str, float]:
    """Score `folder`'s answers again; rewrite its samples and results; returns the new means."""
    records, source = read_samples(folder)
    chat = task in CHAT_TASKS
    with humaneval.allow_code_execution(), ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(lambda r: score(r, chat), records))
    for record, new in zip(records, scores):
        record.update(new)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if source.suffix == ".gz":
        atomic_write(source, gzip.compress(lines.encode("utf-8"), mtime=0))
    else:
        atomic_write(source, lines)
    results = json.loads((folder / "results.json").read_text())
    metrics = results["tasks"][task]
    suffix = "" if records[0].get("filter", "none") == "none" else "/" + records[0]["filter"]
    before, means = {}, {}
    for name in scores[0]:
        values = [s[name] for s in scores]
        key = name + suffix
        before[key] = metrics.get(key)
        means[key] = statistics.fmean(values)
        metrics[key] = means[key]
        metrics[f"{name}_stderr{suffix}"] = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    results.setdefault("before_rescoring", {})[task] = before
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results.setdefault("settings", {})["rescored"] = {
        "commit": commit or None, "at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "by": "scripts/rescore_humaneval.py"}
    atomic_write(folder / "results.json", json.dumps(results, indent=2) + "\n")
    return means


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for name in argv:
        folder = Path(name)
        if not (folder / "results.json").is_file():
            print(f"error: {folder} has no results.json", file=sys.stderr)
            return 2
        tasks = [t for t in json.loads((folder / "results.json").read_text())["tasks"] if "humaneval" in t]
        if len(tasks) != 1:
            print(f"error: {folder}/results.json holds {len(tasks)} HumanEval tasks, expected one", file=sys.stderr)
            return 2
        before = json.loads((folder / "results.json").read_text())["tasks"][tasks[0]]
        means = rescore(folder, tasks[0])
        changes = ", ".join(f"{k} {before.get(k, float('nan')):.4f} -> {v:.4f}" for k, v in means.items())
        print(folder, tasks[0], changes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
