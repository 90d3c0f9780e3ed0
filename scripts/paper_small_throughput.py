"""Training tokens/s of every paper-small method, measured quietly on the same batches.

The paper-small runs shared the CPU with evaluations, so their own tokens/s say little. This re-runs each finished
run's exact recipe (its `recipe.json`: same model, method, data order and seed) for a few steps into a scratch folder,
one method after another in one round, and reports tokens over wall time of the steps after the first `--skip` ones
(warm-up: allocator growth, first-touch of the weights). Every method sees the same batches, so the ratios to dense
compare like with like.

    python scripts/paper_small_throughput.py runs/paper-small --seed 1 --steps 10 --json docs/results/...json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsecraft.hardware import cpu_model, cpu_summary

METHODS = ("dense", "camel", "dense-matched", "pesc", "pesc-camelidae", "mixlora", "upit", "upcycle")


def recipe_of(runs: Path, method: str, seed: int) -> Path:
    """The recipe a finished run trained with (UpIT's trained MoE is its upcycle stage)."""
    run = runs / f"{method}-s{seed}"
    return (run / "upcycle" if method == "upit" else run) / "recipe.json"


def step_rate(metrics: Path, skip: int) -> tuple[float, int, int]:
    """(tokens/s, tokens, steps) over the logged training steps after the first `skip`."""
    tokens = seconds = steps = before = 0
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if not row.get("tokens_per_s"):
            continue
        step_tokens, before = row["tokens"] - before, row["tokens"]  # the log's `tokens` is cumulative
        if row["step"] > skip:
            tokens += step_tokens
            seconds += step_tokens / row["tokens_per_s"]
            steps += 1
    if not steps:
        raise SystemExit(f"error: no training steps after step {skip} in {metrics}")
    return tokens / seconds, tokens, steps


def measure(recipe: Path, out: Path, steps: int, skip: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "sparsecraft", "train", str(recipe), f"output_dir={out}", f"train.max_steps={steps}",
           "train.eval_batches=1", "checkpoint.every=100000", "logging.progress=false", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rate, tokens, timed = step_rate(out / "metrics.jsonl", skip)
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": rate, "tokens": tokens, "timed_steps": timed, "wall_s": time.time() - started,
            "peak_mem_bytes": summary.get("peak_mem_bytes"), "trainable_params": summary.get("trainable_params")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the paper-small runs folder (runs/paper-small)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write the records here")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    recipes = {m: recipe_of(args.runs, m, args.seed) for m in methods}
    missing = [str(p) for p in recipes.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no finished run recipe at {', '.join(missing)}")
    records = {}
    with tempfile.TemporaryDirectory(prefix="sc-throughput-") as scratch:
        for method in methods:
            records[method] = measure(recipes[method], Path(scratch) / method, args.steps, args.skip, args.threads)
            print(f"{method:>15}: {records[method]['tokens_per_s']:7.1f} tokens/s", flush=True)
    dense = records.get("dense", {}).get("tokens_per_s")
    print("\n| method | tokens/s | x dense time | peak memory GiB |\n|---|---|---|---|")
    for method, rec in records.items():
        ratio = f"{dense / rec['tokens_per_s']:.2f}" if dense else "-"
        peak = f"{rec['peak_mem_bytes'] / 2**30:.2f}" if rec["peak_mem_bytes"] else "-"
        print(f"| {method} | {rec['tokens_per_s']:.1f} | {ratio} | {peak} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "cpu": {"model": cpu_model(), **cpu_summary()}, "cpus": os.cpu_count(), "threads": args.threads,
                "seed": args.seed, "steps": args.steps, "skip": args.skip, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({"meta": meta, "methods": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
