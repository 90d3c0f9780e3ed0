"""`sparsecraft upit CONFIG.yaml [key=value ...] [--stage STAGE] [--resume]`: UpIT's four stages."""

from __future__ import annotations

STAGE_CHOICES = ("prepare", "expand", "route", "upcycle", "all")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upit", help="UpIT: experts from checkpoints, expansion, router pre-training, upcycling",
        description="Run the UpIT pipeline (arXiv 2410.01610) from CONFIG.yaml; override any field as key=value "
                    "(e.g. output_dir=runs/x max_steps=10 kind=ffn prepare.num_experts=2 experts=4).")
    p.add_argument("config", help="YAML config (see configs/upit-*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields")
    p.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                   help="run one stage (its inputs must exist) or all four (default)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished stages and continue an interrupted one from its checkpoints")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin weights (they can run code); same as allow_pickle=true")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..upit.config import load_upit_config
    from ..upit.pipeline import run_pipeline

    cfg = load_upit_config(args.config, args.overrides + (["allow_pickle=true"] if args.allow_pickle else []))
    results = run_pipeline(cfg, args.stage, resume=args.resume)
    route = results.get("route") or {}
    if route.get("record_accuracy") is not None:
        print(f"routing accuracy on {route['heldout_records']} held-out seed records: "
              f"{route['record_accuracy']:.3f} (chance {route['chance']:.3f})")
    summary = results.get("upcycle") or {}
    if "model_dir" in summary:
        loss, before = summary.get("eval_loss"), summary.get("initial_eval_loss")
        held_out = f", held-out loss {before:.3f} -> {loss:.3f}" if loss is not None and before is not None else ""
        print(f"post-trained the {cfg.kind} MoE for {summary['steps']} steps: train loss "
              f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{held_out}")
        print(f"model written to {summary['model_dir']}; try it: sparsecraft generate {summary['model_dir']} "
              "--prompt \"What is 15% of 240?\"")
    return 0
