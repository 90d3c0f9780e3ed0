"""`sparsecraft export MODEL OUT`: merge LoRA into the (de-quantised) base and write a standalone model;
`--to mixtral|qwen2_moe|qwen3_moe` writes a Sparse-Upcycling model as that standard MoE architecture instead
(exact: checked by comparing logits after writing)."""

from __future__ import annotations

# largest logit difference accepted between the sparsecraft model and its native export, by dtype
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.05}


def add_parser(sub) -> None:
    from ..checkpoint.native_moe import TARGETS

    p = sub.add_parser("export", help="merge LoRA into the base and write a standalone model, or a native MoE")
    p.add_argument("model", help="a trained model directory (RUN/model) or any model sparsecraft loads")
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (float32, bfloat16)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (they can run code)")
    p.add_argument("--to", choices=(*TARGETS, "vllm"), default=None,
                   help="write an upcycled model as a plain transformers MoE (no sparsecraft needed to load it): "
                        "mixtral for LLaMA/Mistral bases, qwen2_moe / qwen3_moe for Qwen2 / Qwen3 bases; vllm: a "
                        "PESC model for vLLM with the sparsecraft plugin (docs/serving.md)")
    p.add_argument("--no-verify", action="store_true",
                   help="with --to: skip loading the export back to compare its logits (saves memory)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.to is not None:
        from ..atomic import check_output_path

        check_output_path(args.out, empty=True)  # before loading the model
    if args.to is None:
        from ..train.artifacts import export_merged

        out = export_merged(args.model, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle)
        print(f"standalone model written to {out}")
        return 0
    if args.to == "vllm":
        return run_vllm(args)
    return run_native(args)


def _dtype(name):
    from ..sources import torch_dtype

    return None if name is None else torch_dtype(name)


def _tokenizer(path, model):
    from ..errors import CheckpointError
    from ..generation import load_tokenizer_for

    try:
        return load_tokenizer_for(path, model)
    except CheckpointError:
        return None


def run_vllm(args) -> int:
    from ..integrations.vllm.layout import check_servable, write_vllm_dir
    from ..loading import load

    model = load(args.model, dtype=_dtype(args.dtype), allow_pickle=args.allow_pickle)
    check_servable(model)
    out = write_vllm_dir(model, args.out, tokenizer=_tokenizer(args.model, model), dtype=_dtype(args.dtype))
    print(f"vLLM directory written to {out}: serve it with `vllm serve {out}` where sparsecraft[vllm] is installed")
    return 0


def run_native(args) -> int:
    from transformers import AutoModelForCausalLM

    from ..checkpoint.native_moe import export_native, max_logit_difference, plan_export
    from ..errors import CheckpointError
    from ..loading import load

    dtype = _dtype(args.dtype)
    model = load(args.model, dtype=dtype, allow_pickle=args.allow_pickle)
    plan_export(model, args.to)  # refuse before reading the tokenizer or writing anything
    out = export_native(model, args.out, args.to, tokenizer=_tokenizer(args.model, model), dtype=dtype)
    print(f"{args.to} checkpoint written to {out} (loads with transformers alone)")
    if args.no_verify:
        return 0
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype or model.dtype).eval()
    diff = max_logit_difference(model, exported, model.config.get_text_config().vocab_size)
    limit = TOLERANCE.get(str(exported.dtype).removeprefix("torch."), 1e-4)
    if not diff <= limit:
        raise CheckpointError(f"the {args.to} export at {out} differs from the model: max |logit difference| "
                              f"{diff:.3g} > {limit}; please report this")
    print(f"verified: max |logit difference| {diff:.2e} on a random probe")
    return 0
