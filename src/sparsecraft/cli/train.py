"""`sparsecraft train RECIPE.yaml [key=value ...] [--resume]`: craft and instruction-tune in one run."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="craft + instruction-tune from a YAML recipe",
                       description="Train from RECIPE.yaml; override any field as key=value "
                                   "(e.g. max_steps=10 output_dir=runs/x data=my.jsonl method=dense).")
    p.add_argument("recipe", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested fields (optim.lr=1e-4)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--apply-changes", action="store_true",
                   help="with --resume: apply a changed lr, betas, eps, weight decay, max_grad_norm or max_steps "
                        "(the lr schedule laid over the new length) from here on")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="parameters and per-GPU memory under each engine, from the model's config alone")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin base weights (they can run code); same as allow_pickle=true")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..report import format_parts
    from ..train.loop import run as run_recipe
    from ..train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides + (["allow_pickle=true"] if args.allow_pickle else []))
    if args.dry_run:
        from ..scale import plan_training

        print(plan_training(recipe).format())
        return 0
    summary = run_recipe(recipe, resume=args.resume, overwrite=args.overwrite, apply_changes=args.apply_changes)
    if "model_dir" in summary:
        loss, before = summary.get("eval_loss"), summary.get("initial_eval_loss")
        held_out = f", held-out loss {before:.3f} -> {loss:.3f}" if loss is not None and before is not None else ""
        print(f"trained {recipe.method} for {summary['steps']} steps in {summary['train_seconds']:.0f} s: "
              f"train loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{held_out}")
        if summary.get("trainable_by_part"):
            print(f"trainable {summary['trainable_params']:,} = {format_parts(summary['trainable_by_part'])}")
        print(f"model written to {summary['model_dir']}; logs in {recipe.output_dir}/metrics.jsonl")
        print(f"try it: sparsecraft generate {summary['model_dir']} --prompt \"What is 15% of 240?\"")
    return 0
