"""PESC against dense training steps of a real recipe, with the adapters in the base's precision or in fp32.

    python scripts/adapter_dtype_probe.py configs/quickstart.yaml [--rounds 6] [--seq-len 256] [--out x.json]

Builds the recipe three times: `method=dense`, `method=pesc` with the adapters computing in the base's compute
dtype (what `sparsecraft train` does: bf16 under `precision: auto` on bf16 CPUs) and `method=pesc` with the
adapters forced back to fp32. The experts' up-projections get small random values (they start at zero, which
would hide nothing but is not a trained model's state). After one warm-up step each, every round times forward +
backward + AdamW on one fixed batch `[batch_size, seq_len]` for every variant in turn (`bench.timing.round_robin`).
Prints median seconds per step and each variant's ratio to dense, with the CPU's bf16 flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch

from sparsecraft.bench.timing import Timed, round_robin
from sparsecraft.hardware import cpu_summary
from sparsecraft.moe.layers import set_adapter_compute_dtype
from sparsecraft.moe.probe import PROBE
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters

VARIANTS = ("dense", "pesc", "pesc-fp32-adapters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (plus one warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the figures as JSON here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for variant in VARIANTS:
        method = "dense" if variant == "dense" else "pesc"
        recipe = load_recipe(args.recipe, [*args.overrides, f"method={method}"])
        built = build_model(recipe)
        if variant == "pesc-fp32-adapters":
            set_adapter_compute_dtype(built.model, None)
        gen = torch.Generator().manual_seed(0)  # the same values in both PESC variants
        with torch.no_grad():
            for name, p in built.model.named_parameters():
                if name.endswith("experts.up"):
                    p.normal_(0.0, 0.02, generator=gen)
        optimizer = torch.optim.AdamW(list(trainable_parameters(built.model).values()), lr=1e-5)
        models[variant] = (built.model, optimizer)
    batch = recipe.train.batch_size
    ids = torch.randint(0, built.inner.config.vocab_size, (batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    def step(model, optimizer) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    items = [Timed(variant, partial(step, *pair), reset=partial(pair[1].zero_grad, set_to_none=True))
             for variant, pair in models.items()]
    round_robin(items, args.rounds, warmup=1, sync=lambda: None, progress=False)
    times = {item.name: item.times_s for item in items}
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {"recipe": args.recipe, "overrides": args.overrides, "batch": [batch, args.seq_len],
              "threads": torch.get_num_threads(), **cpu_summary(), "seconds": times,
              "median_s": medians, "over_dense": {v: m / medians["dense"] for v, m in medians.items()},
              "dispatch": {"/".join(map(str, key)): r.path for key, r in PROBE.results().items()}}
    for variant, median in medians.items():
        print(f"{variant}: median {median:.3f} s/step, {result['over_dense'][variant]:.3f}x dense")
    print(f"cpu_bf16: {result['cpu_bf16']}; dispatch: {result['dispatch']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
