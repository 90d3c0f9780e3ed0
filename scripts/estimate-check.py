"""Memory estimate vs measured peak on this machine (issue: scale): train the quickstart recipe (real SmolLM2,
NF4, gradient checkpointing on, so the estimate's assumptions hold) and compare with
`sparsecraft.memory.estimate_training_memory` for the same model, batch and sequence length, in fp32 (what the
CPU computes in). Two comparisons: the whole estimate against the peak RSS above the process after its imports,
and the estimate without the base weights (already resident when training starts) against the growth of RSS
during training. Run it with `MALLOC_MMAP_THRESHOLD_=131072` so freed tensors go back to the OS and RSS follows
live memory (docs/benchmarks.md explains why glibc's default makes RSS overstate it).

    MALLOC_MMAP_THRESHOLD_=131072 python scripts/estimate-check.py [key=value ...]   # e.g. max_steps=10
"""

from __future__ import annotations

import json
import sys


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def main(overrides: list[str]) -> None:
    import torch  # noqa: F401  (imports first: the baseline is the process with its libraries loaded)
    import transformers  # noqa: F401

    import sparsecraft  # noqa: F401
    from sparsecraft.memory import estimate_training_memory, gib
    from sparsecraft.train import loop
    from sparsecraft.train.recipe import load_recipe

    baseline = rss_bytes()
    recipe = load_recipe("configs/quickstart.yaml", ["train.gradient_checkpointing=true", "max_steps=12",
                                                     "checkpoint.every=0", "output_dir=runs/estimate-check",
                                                     "logging.progress=false", *overrides])
    built_models = []
    original = loop.build_model

    def keep(recipe, device="cpu"):
        built = original(recipe, device=device)
        built_models.append(built)
        return built

    loop.build_model = keep
    at_start = {}
    reset = loop.reset_peak_memory

    def reset_and_note(device):
        at_start["rss"] = rss_bytes()  # the model, the data and the optimizer are in memory now
        reset(device)

    loop.reset_peak_memory = reset_and_note
    summary = loop.run(recipe, overwrite=True)
    model = built_models[0].inner
    lengths = recipe.data.get("max_length", 256)
    estimate = estimate_training_memory(model, batch_size=recipe.train.batch_size, seq_len=lengths,
                                        lora_rank=recipe.lora.r, lora_targets=tuple(recipe.lora.targets),
                                        quantization="nf4" if recipe.quantization == "nf4" else "bf16", act_bytes=4)
    measured = summary["peak_mem_bytes"] - baseline
    growth = summary["peak_mem_bytes"] - at_start["rss"]
    # at the start of training the weights are resident, the optimizer state not yet (AdamW creates it lazily)
    training_part = estimate.total - estimate.components["base weights"]
    print(estimate.format())
    result = {"estimate_bytes": estimate.total, "measured_above_imports": measured,
              "estimate_training_part": training_part, "measured_growth_in_training": growth,
              "peak_rss": summary["peak_mem_bytes"], "rss_after_imports": baseline, "rss_at_training_start":
              at_start["rss"], "tokens_per_s": summary["tokens_per_s"]}
    print(json.dumps(result, indent=1))
    print(f"whole: estimate {gib(estimate.total)} vs {gib(measured)} above the imports "
          f"({100 * (estimate.total / measured - 1):+.1f} %); training phase: estimate {gib(training_part)} vs "
          f"growth {gib(growth)} ({100 * (training_part / growth - 1):+.1f} %)")


if __name__ == "__main__":
    main(sys.argv[1:])
