"""`sparsecraft export MODEL OUT`: merge LoRA into the (de-quantised) base and write a standalone model."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge LoRA into the base and write a standalone model")
    p.add_argument("model", help="a trained model directory (RUN/model) or any model sparsecraft loads")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (float32, bfloat16)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (they can run code)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..train.artifacts import export_merged

    out = export_merged(args.model, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle)
    print(f"standalone model written to {out}")
    return 0
