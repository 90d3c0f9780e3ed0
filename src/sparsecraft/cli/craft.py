"""`sparsecraft craft BASE OUT`: craft a base with a registered method (PESC by default) and save it; `--dry-run`
sizes it from the config."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ATTENTION_LORA_TARGETS, FFN_LORA_TARGETS
from ..errors import CheckpointError
from ..methods import method_names
from .options import add_craft_options, craft_config_from_options


def add_parser(sub) -> None:
    p = sub.add_parser("craft", help="turn a dense model into a mixture of experts (PESC by default)",
                       description="Craft BASE (directory, .gguf file, or built-in name such as smollm2-135m).")
    p.add_argument("base", help="base model: directory, .gguf file, config.json, or built-in name")
    p.add_argument("out", nargs="?", help="output directory (not needed with --dry-run)")
    crafting = method_names(crafts=True)
    p.add_argument("--method", default="pesc", choices=crafting,
                   help=f"registered method that crafts from the base alone: {', '.join(crafting)} (default pesc)")
    add_craft_options(p.add_argument_group("crafting settings (CraftConfig)"))
    p.add_argument("--standalone", action="store_true", help="copy the base weights into OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds something")
    p.add_argument("--dtype", default=None, help="dtype to load the base in (float32, bfloat16, float16)")
    p.add_argument("--seed", type=int, default=0, help="seed for the new weights' initialisation")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (they can run code)")
    p.add_argument("--dry-run", action="store_true",
                   help="report parameters and training memory from the config alone (meta device, no weights)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for the --dry-run memory estimate")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the --dry-run memory estimate")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank for the --dry-run memory estimate")
    p.add_argument("--lora-targets", default=",".join(ATTENTION_LORA_TARGETS),
                   help="comma-separated Linear names LoRA wraps in the --dry-run (default: attention q,k,v,o)")
    p.add_argument("--lora-ffn", action="store_true",
                   help="--dry-run: also LoRA on the FFN (gate/up/down), as the paper's Camel/Camelidae runs")
    p.set_defaults(run=run)


def run(args) -> int:
    cfg = craft_config_from_options(args)  # validate settings before any loading
    if args.dry_run:
        from ..report import dry_run

        for name in ("batch_size", "seq_len", "lora_rank"):
            if getattr(args, name) <= 0:
                raise CheckpointError(f"--{name.replace('_', '-')} must be positive")
        start = time.perf_counter()
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        if args.lora_ffn:
            targets += tuple(t for t in FFN_LORA_TARGETS if t not in targets)
        report = dry_run(args.base, cfg, batch_size=args.batch_size, seq_len=args.seq_len, lora_rank=args.lora_rank,
                         lora_targets=targets, method=args.method)
        print(report.format())
        print(f"(dry run from the config alone in {time.perf_counter() - start:.2f} s)")
        return 0
    if not args.out:
        raise CheckpointError("craft needs an output directory (or --dry-run)")
    from ..atomic import check_output_path

    target = check_output_path(args.out)  # before loading the base
    base = Path(args.base).expanduser().resolve()
    if base.exists() and (target.resolve() == base or target.resolve() in base.parents):
        raise CheckpointError(f"{args.out} holds the base model {args.base}; write the crafted model elsewhere")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        raise CheckpointError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    from ..checkpoint.crafted import save_crafted
    from ..loading import craft_from
    from ..report import parameter_report

    start = time.perf_counter()
    model = craft_from(args.base, cfg, dtype=args.dtype, seed=args.seed, method=args.method,
                       allow_pickle=args.allow_pickle)
    print(parameter_report(model).format())
    out = save_crafted(model, args.out, standalone=args.standalone)
    kind = "standalone" if args.standalone else f"referring to base {args.base}"
    print(f"crafted model written to {out} ({kind}) in {time.perf_counter() - start:.1f} s")
    print(f"try it: sparsecraft generate {out} --prompt \"What is 12 * 7?\"")
    return 0
