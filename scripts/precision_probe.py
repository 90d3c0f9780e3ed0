"""fp32 against bf16 base compute for a real training recipe, steps interleaved in one process.

    python scripts/precision_probe.py configs/paper-small/pesc.yaml [--rounds 8] [--threads 1] [--out x.json]

Builds the recipe's model twice (`train.precision=fp32` and `=bf16`: NF4 de-quantised to that dtype, trainable
weights fp32 in both), then times forward + backward + AdamW on one fixed batch `[batch_size, max_length]`,
alternating which precision goes first each round, so that load from other processes hits both alike. Prints
the median and p10-p90 seconds per step and the fp32/bf16 ratio, with the CPU's bf16 flags; the first round is
warm-up. This is the measurement behind `precision: auto` choosing bf16 on AMX-BF16 CPUs (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sparsecraft.data.config import DataConfig
from sparsecraft.hardware import cpu_summary
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (plus one warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for precision in ("fp32", "bf16"):
        recipe = load_recipe(args.recipe, [*args.overrides, f"train.precision={precision}"])
        built = build_model(recipe)
        optimizer = torch.optim.AdamW(list(trainable_parameters(built.model).values()), lr=1e-5)
        models[precision] = (built.model, optimizer)
    batch, length = recipe.train.batch_size, recipe.data.get("max_length", DataConfig.max_length)
    ids = torch.randint(0, built.inner.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {p: [] for p in models}
    for round_ in range(args.rounds + 1):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for precision in order:
            model, optimizer = models[precision]
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:
                times[precision].append(time.perf_counter() - start)
    result = {"recipe": args.recipe, "overrides": args.overrides, "batch": [batch, length],
              "threads": torch.get_num_threads(), **cpu_summary(),
              **{p: {"median_s": statistics.median(v), "p10_s": quantile(v, 0.1), "p90_s": quantile(v, 0.9)}
                 for p, v in times.items()}}
    result["fp32_over_bf16"] = result["fp32"]["median_s"] / result["bf16"]["median_s"]
    for p in models:
        r = result[p]
        print(f"{p}: median {r['median_s']:.2f} s/step (p10-p90 {r['p10_s']:.2f}-{r['p90_s']:.2f})")
    print(f"fp32 / bf16 = {result['fp32_over_bf16']:.3f}  (cpu_bf16: {result['cpu_bf16']})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
