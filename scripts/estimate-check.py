"""Memory estimate vs measured peak on this machine (issue: scale): train the quickstart recipe (real SmolLM2,
NF4, gradient checkpointing on, so the estimate's assumptions hold) and compare the training phase's peak RSS
above the process's RSS after imports with `sparsecraft.memory.estimate_training_memory` for the same model,
batch and sequence length, in fp32 (what the CPU computes in).

    python scripts/estimate-check.py [key=value ...]      # recipe overrides, e.g. max_steps=10
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
    summary = loop.run(recipe, overwrite=True)
    model = built_models[0].inner
    lengths = recipe.data.get("max_length", 256)
    estimate = estimate_training_memory(model, batch_size=recipe.train.batch_size, seq_len=lengths,
                                        lora_rank=recipe.lora.r, lora_targets=tuple(recipe.lora.targets),
                                        quantization="nf4" if recipe.quantization == "nf4" else "bf16", act_bytes=4)
    measured = summary["peak_mem_bytes"] - baseline
    print(estimate.format())
    result = {"estimate_bytes": estimate.total, "measured_bytes": measured, "peak_rss": summary["peak_mem_bytes"],
              "baseline_rss": baseline, "ratio": estimate.total / measured}
    print(json.dumps(result, indent=1))
    print(f"estimate {gib(estimate.total)} vs measured {gib(measured)} above the imports: "
          f"{100 * (estimate.total / measured - 1):+.1f} %")


if __name__ == "__main__":
    main(sys.argv[1:])
