"""PESC against dense training steps of a real recipe: adapters in the base's precision or fp32, and dropout
drawn as `sparsecraft.moe.dropout` draws it or by torch's own `F.dropout`.

    python scripts/adapter_dtype_probe.py configs/quickstart.yaml [--rounds 6] [--seq-len 256] [--out x.json]
        [--variants dense pesc pesc-fp32-adapters dense-torch-dropout pesc-torch-dropout pesc-grouped
                    pesc-masked-dense pesc-padded pesc-grouped-exact pesc-masked-dense-composite] [--no-onednn]

Builds the recipe once per variant: `dense`, `pesc` with the adapters computing in the base's compute dtype (what
`sparsecraft train` does: bf16 under `precision: auto` on bf16 CPUs), `pesc-fp32-adapters` with them forced back to
fp32, and `dense-` / `pesc-torch-dropout` with torch's dropout put back (peft's LoRA dropout modules and PESC's
adapter dropout), and `pesc-grouped` / `pesc-masked-dense` / `pesc-padded` with the dispatch path pinned instead of
probed; `pesc-grouped-exact` (groups of exact row counts, not whole tiles, in bf16) and `pesc-masked-dense-composite`
(the masked-dense path from torch ops under autograd, not the Function) put the earlier kernels back for
their own steps only. The experts' up-projections get small random values (they start at zero, which would hide
nothing but is not a trained model's state). After one warm-up step each, every round times forward + backward +
AdamW on one fixed batch `[batch_size, seq_len]` for every variant in turn (`bench.timing.round_robin`). AdamW is
fused, as in training. Prints median seconds per step and each variant's ratio to the first, with the CPU's bf16
flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import sparsecraft.moe.experts as experts
import sparsecraft.moe.grouped as grouped
import sparsecraft.moe.layers as moe_layers
from sparsecraft.bench.timing import Timed, round_robin
from sparsecraft.hardware import cpu_summary
from sparsecraft.moe.dropout import LaneDropout
from sparsecraft.moe.layers import set_adapter_compute_dtype
from sparsecraft.moe.probe import PROBE
from sparsecraft.train.optim import adamw
from sparsecraft.train.recipe import load_recipe
from sparsecraft.train.setup import build_model, trainable_parameters

VARIANTS = ("dense", "pesc", "pesc-fp32-adapters", "dense-torch-dropout", "pesc-torch-dropout", "pesc-grouped",
            "pesc-masked-dense", "pesc-padded", "pesc-grouped-exact", "pesc-masked-dense-composite")
# variants that pin PESC's dispatch path instead of letting the probe choose (`craft.dispatch`)
DISPATCH = {"pesc-grouped": "grouped", "pesc-masked-dense": "dense", "pesc-padded": "padded",
            "pesc-grouped-exact": "grouped", "pesc-masked-dense-composite": "dense"}
# module attributes swapped for one variant's steps only (the earlier kernels, for same-process A/B)
PATCHES = {
    "pesc-grouped-exact": [(grouped, "row_multiple", lambda dtype, device: 1)],  # exact per-expert row counts
    "pesc-masked-dense-composite": [(experts, "masked_dense_adapters", experts.masked_dense_composite)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (plus one warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the figures as JSON here too")
    parser.add_argument("--no-onednn", action="store_true",
                        help="turn oneDNN off (torch.backends.mkldnn): with ATEN_CPU_CAPABILITY=avx2 "
                             "ONEDNN_MAX_CPU_ISA=AVX2 this takes the kernels an AVX2-only CPU would run")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]),
                        help="what to time (dense first: the ratios are to it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_onednn:
        torch.backends.mkldnn.enabled = False
    models = {}
    for variant in args.variants:
        method = variant.split("-")[0]
        pinned = [f"craft.dispatch={DISPATCH[variant]}"] if variant in DISPATCH else []
        recipe = load_recipe(args.recipe, [*args.overrides, f"method={method}", *pinned])
        built = build_model(recipe)
        if variant == "pesc-fp32-adapters":
            set_adapter_compute_dtype(built.model, None)
        if variant.endswith("torch-dropout"):
            torch_dropout(built.model)
        gen = torch.Generator().manual_seed(0)  # the same values in both PESC variants
        with torch.no_grad():
            for name, p in built.model.named_parameters():
                if name.endswith("experts.up"):
                    p.normal_(0.0, 0.02, generator=gen)
        optimizer = adamw(trainable_parameters(built.model).values(), lr=1e-5)  # as training makes it
        models[variant] = (built.model, optimizer)
    batch = recipe.train.batch_size
    ids = torch.randint(0, built.inner.config.vocab_size, (batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    def step(model, optimizer, torch_drop: bool, patches: list) -> None:
        moe_layers.lane_dropout = F.dropout if torch_drop else lane_dropout
        originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
        for module, name, value in patches:
            setattr(module, name, value)
        try:
            model(input_ids=ids, labels=ids).loss.backward()
        finally:
            for module, name, value in originals:
                setattr(module, name, value)
        optimizer.step()

    lane_dropout = moe_layers.lane_dropout

    items = [Timed(variant, partial(step, *pair, variant.endswith("torch-dropout"), PATCHES.get(variant, [])),
                   reset=partial(pair[1].zero_grad, set_to_none=True)) for variant, pair in models.items()]
    round_robin(items, args.rounds, warmup=1, sync=lambda: None, progress=False)
    times = {item.name: item.times_s for item in items}
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {"recipe": args.recipe, "overrides": args.overrides, "batch": [batch, args.seq_len],
              "onednn": torch.backends.mkldnn.enabled,
              "threads": torch.get_num_threads(), **cpu_summary(), "seconds": times,
              "median_s": medians, "over_dense": {v: m / medians[args.variants[0]] for v, m in medians.items()},
              "dispatch": {"/".join(map(str, key)): r.path for key, r in PROBE.results().items()}}
    for variant, median in medians.items():
        print(f"{variant}: median {median:.3f} s/step, {result['over_dense'][variant]:.3f}x dense")
    print(f"cpu_bf16: {result['cpu_bf16']}; dispatch: {result['dispatch']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


def torch_dropout(model: nn.Module) -> None:
    """Put torch's `nn.Dropout` back where `sparsecraft.train.setup` swapped in `LaneDropout`."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LaneDropout):
                setattr(parent, name, nn.Dropout(child.p))


if __name__ == "__main__":
    main()
