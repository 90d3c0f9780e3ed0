"""`sparsecraft convert SRC OUT --to LAYOUT`: move a PESC model between sparsecraft's format and the published
Camelidae / Sparsetral layouts (and off pickled .bin shards)."""

from __future__ import annotations

LAYOUTS = ("sparsecraft", "camelidae", "sparsetral")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between sparsecraft and the published Camelidae/Sparsetral layouts")
    p.add_argument("src", help="a crafted sparsecraft directory or a published Camelidae/Qwen2idae/Sparsetral one")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=LAYOUTS, default="sparsecraft", help="layout to write (default sparsecraft)")
    p.add_argument("--allow-pickle", action="store_true", help="allow reading pickled .bin shards (can run code)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..atomic import check_output_path
    from ..checkpoint.crafted import save_crafted
    from ..checkpoint.published_export import export_published
    from ..errors import CheckpointError
    from ..loading import load
    from ..surgery import is_crafted

    check_output_path(args.out)  # before loading
    model = load(args.src, allow_pickle=args.allow_pickle)
    if not is_crafted(model):
        raise CheckpointError(f"{args.src} is a dense model; craft it first (sparsecraft craft)")
    if args.to == "sparsecraft":
        import os

        if os.path.exists(args.out) and not args.overwrite:
            raise CheckpointError(f"{args.out} exists; pass --overwrite to replace it")
        # a published checkpoint carries its base inside, and a merged LoRA changed the base's weights: then the
        # converted model is standalone
        standalone = (getattr(model, "_sparsecraft_base", None) is None
                      or bool(getattr(model, "_sparsecraft_base_changed", None)))
        out = save_crafted(model, args.out, standalone=standalone)
    else:
        from pathlib import Path

        from ..checkpoint.card import write_model_card
        from ..checkpoint.crafted import read_config
        from ..methods import method_of

        out = export_published(model, args.out, layout=args.to, overwrite=args.overwrite)
        # the published layout holds its base: a card of the method and settings, as any model directory has
        card_config = {"method": method_of(model).name, "craft": model._sparsecraft_config.to_dict(),
                       **read_config(out)}
        write_model_card(out, card_config, standalone=True, name=Path(out).name)
    _copy_tokenizer(args.src, out, model)
    print(f"wrote {args.to} layout to {out}")
    return 0


def _copy_tokenizer(src, out, model) -> None:
    """Keep the tokenizer with the converted model when the source has one (a missing one is not an error)."""
    from ..errors import CheckpointError
    from ..generation import load_tokenizer_for

    try:
        load_tokenizer_for(src, model).save_pretrained(str(out))
    except (CheckpointError, OSError, ValueError):
        pass
