"""`sparsecraft routes MODEL [DATA ...] --out DIR`: which experts each layer uses, per data source, with plots."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "routes", help="routing statistics of a pesc/upcycle model over data (do experts specialise?)",
        description="Count, per crafted layer and expert, the share of routed tokens, the mean gate, the router "
                    "entropy, which experts are chosen together and which experts each data source uses; write "
                    "routes.json, CSVs and plots into --out.")
    p.add_argument("model", help="a crafted (pesc or upcycle) model directory")
    p.add_argument("data", nargs="*",
                   help="NAME=PATH.jsonl or PATH (name: the file name) or a recipe YAML (its eval sources); "
                        "default: the eval sources of the recipe the model was trained with")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-records", type=int, default=200, help="first N usable records of each file (default 200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per record (default: the training recipe's data.max_length, else 512)")
    p.add_argument("--template", default=None,
                   help="chat template: auto (default; a trained model's tokenizer carries its training template), "
                        "tokenizer, camelidae, chatml")
    p.add_argument("--metrics", default=None,
                   help="a training metrics.jsonl for the aux-loss / imbalance curve (default: the one beside the "
                        "model directory, if any)")
    p.add_argument("--dtype", default=None, help="model dtype (default: as saved)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (they can run code)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..atomic import check_output_path
    from ..data import DataConfig
    from ..evaluate.route_data import data_sources, routing_stats, saved_method, saved_recipe_data
    from ..evaluate.routes import format_summary, write_routes
    from ..generation import load_tokenizer_for
    from ..loading import load
    from ..methods import get_method

    for flag, value in (("--max-records", args.max_records), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    model_dir = Path(args.model)
    if not model_dir.exists():
        raise ConfigError(f"model not found: {args.model}")
    check_output_path(args.out)  # before the work
    method_name = saved_method(model_dir)
    if method_name is not None and not get_method(method_name).builds_moe:  # refuse before loading the weights
        raise ConfigError(f"{args.model} is a dense (method: {method_name}) model: routing needs a model with "
                          "experts")
    saved = saved_recipe_data(model_dir)
    if args.data:
        sources = data_sources(args.data)
    elif saved is not None:
        config = DataConfig.from_dict(saved)
        sources = config.eval_sources or config.sources
        print(f"routing over the training recipe's {'eval ' if config.eval_sources else ''}sources: "
              + ", ".join(sorted({s.display_name for s in sources})))
    else:
        raise ConfigError("no DATA given and the model has no saved training recipe to take eval sources from")
    max_length = args.max_length or int((saved or {}).get("max_length", 512))
    truncation = str((saved or {}).get("truncation", "right"))
    metrics = Path(args.metrics) if args.metrics else model_dir.resolve().parent / "metrics.jsonl"
    if args.metrics and not metrics.is_file():
        raise ConfigError(f"metrics file not found: {args.metrics}")

    model = load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer_for(args.model, model)
    stats = routing_stats(model, tokenizer, sources, max_records=args.max_records, batch_size=args.batch_size,
                          max_length=max_length, template=args.template or "auto", truncation=truncation,
                          progress=not args.no_progress)
    found = metrics if metrics.is_file() else None
    written = write_routes(stats, args.out, found, title=found.parent.name if found is not None else None)
    print(format_summary(stats))
    if stats.dropped:
        print(f"left out at tokenisation: {stats.dropped}")
    print(f"wrote {len(written)} files to {args.out}: " + ", ".join(p.name for p in written if p.suffix == ".png"))
    return 0
