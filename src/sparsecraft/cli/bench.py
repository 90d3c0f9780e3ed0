"""`sparsecraft bench`: time dense, PESC (each dispatch path), upcycling and the per-expert loop side by side,
at block and model level, with FLOP floors, peak memory and decode speed."""

from __future__ import annotations

import sys

from ..errors import ConfigError
from .options import add_craft_options

# the crafting settings a bench run takes from the command line (BenchSettings.experts, top_k, adapter_dim)
BENCH_CRAFT_FIELDS = ("num_experts", "top_k", "adapter_dim")


def add_parser(sub) -> None:
    from ..bench.settings import MEMORY_ALLOCATORS, METHODS, SHAPES, BenchSettings

    d = BenchSettings()
    p = sub.add_parser(
        "bench", help="benchmark PESC against dense, upcycling and the per-expert loop",
        description="Time every method interleaved round by round in one process; ratios to dense are the "
                    "headline. Peak memory is measured in a separate process per variant.")
    p.add_argument("--level", choices=("block", "model", "both"), default="both",
                   help="the MoE block alone, the whole model, or both (default)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)} (default all)")
    p.add_argument("--shape", default=d.shape, help=f"model shape with random weights: {', '.join(SHAPES)}")
    p.add_argument("--model", default=None, help="a real dense base instead of --shape (directory, .gguf, built-in)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin weights of --model / --serve models (they can run code)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    add_craft_options(p, only=BENCH_CRAFT_FIELDS)  # --experts, --top-k, --adapter-dim
    p.add_argument("--tokens", type=int, default=d.tokens, help="block level: tokens per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="model level: sequence length")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="model level: batch size")
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 (autocast on CUDA) or float16")
    p.add_argument("--4bit", dest="four_bit", action="store_true", help="model level: NF4 base (bitsandbytes)")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank on q,k,v,o (model level)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed rounds")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant first")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="greedy tokens per decode (0: skip)")
    p.add_argument("--decode-repeats", type=int, default=d.decode_repeats, help="timed decode rounds")
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda[:N]")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--memory-allocator", choices=MEMORY_ALLOCATORS, default="default",
                   help="peak-memory workers: glibc as configured, 'live' (fixed 128 KiB mmap threshold: "
                        "RSS follows live tensors, not heap fragmentation) or 'trim' (freed heap handed back "
                        "between decoder layers, as train.trim_heap does)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", default=None, metavar="FILE", help="write every record (and settings, machine) here")
    s = p.add_argument_group("serving load (--serve)")
    s.add_argument("--serve", default=None, metavar="MODEL",
                   help="instead: serve MODEL and its dense base in turn on 127.0.0.1 and drive concurrent clients")
    s.add_argument("--serve-base", default=None, metavar="BASE", help="the dense model to compare with (default: "
                   "the base MODEL refers to)")
    s.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of load per model (default 60)")
    s.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request (default 64)")
    s.add_argument("--max-batch-size", type=int, default=None, help="server batch size (default: --clients)")
    s.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (default 3)")
    p.set_defaults(run=run)


def settings_from_args(args):
    from ..bench.settings import LEVELS, BenchSettings

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return BenchSettings(
        levels=list(LEVELS) if args.level == "both" else [args.level], methods=methods, shape=args.shape,
        model=args.model, allow_pickle=args.allow_pickle, layers=args.layers, experts=args.experts,
        top_k=args.top_k, adapter_dim=args.adapter_dim,
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype,
        four_bit=args.four_bit, threads=args.threads, repeats=args.repeats, warmup=args.warmup,
        decode_tokens=args.decode_tokens, decode_repeats=args.decode_repeats, lora_rank=args.lora_rank,
        device=args.device, seed=args.seed, memory=not args.no_memory, memory_allocator=args.memory_allocator,
    )


def run(args) -> int:
    if args.json:  # before the benchmark, not after it: a directory or unwritable place is refused at once
        from ..atomic import check_output_path

        check_output_path(args.json, directory=False)
    if args.serve is not None:
        return run_serve(args)
    import torch

    from ..bench.report import format_table, write_json
    from ..bench.runner import run_bench

    settings = settings_from_args(args)
    settings.validate()
    if settings.torch_device().type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device")
    result = run_bench(settings, progress=not args.no_progress, log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"records written to {args.json}")
    return 0


def run_serve(args) -> int:
    """`--serve`: the load benchmark of a crafted model beside its dense base (docs/serving.md)."""
    import json

    from ..bench.serve_bench import base_of, machine, run_serve_bench
    from ..bench.serve_load import format_load_table

    if args.clients < 1 or args.duration <= 0 or args.max_tokens < 1 or args.rounds < 1:
        raise ConfigError("--clients, --max-tokens and --rounds must be positive, --duration > 0")
    try:
        from ..serve.process import start_server_process
        from ..serve.settings import ServeSettings
    except ImportError as exc:
        raise ConfigError(f"bench --serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'sparsecraft[serve]'") from None
    base = args.serve_base or base_of(args.serve)
    batch = args.max_batch_size or args.clients

    def start(model: str):
        settings = ServeSettings(model=model, port=0, max_batch_size=batch, max_queue=max(64, args.clients),
                                 threads=args.threads, log_level="warning", dtype=args.dtype,
                                 allow_pickle=args.allow_pickle)
        return start_server_process(settings.validate())

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = run_serve_bench([("dense " + base, base), ("crafted " + args.serve, args.serve)], start,
                              clients=args.clients, duration_s=args.duration, max_tokens=args.max_tokens,
                              rounds=args.rounds, log=log)
    print(format_load_table(results))
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; {info['date']}; crafted/dense generated tokens/s "
          f"{results[1].tokens_per_s / results[0].tokens_per_s:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "settings": {"clients": args.clients, "duration_s": args.duration,
                                                     "max_tokens": args.max_tokens, "max_batch_size": batch,
                                                     "rounds": args.rounds},
                       "results": [r.to_dict() for r in results]}, f, indent=2)
        print(f"records written to {args.json}")
    return 0
