"""`sparsecraft generate PATH --prompt ...`: greedy or sampled generation with KV cache, streamed."""

from __future__ import annotations

import sys

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a crafted, trained, published or dense model")
    p.add_argument("path", help="model directory, .gguf file or built-in name")
    p.add_argument("--prompt", required=True, help="the user prompt ('-' reads standard input)")
    p.add_argument("--system", default=None, help="system prompt (chat template only)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache (slower; for checks)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", action="store_true",
                   help="run the PESC blocks under torch.compile (the first tokens wait for the compile)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..generation import generate_text, load_tokenizer_for
    from ..loading import load

    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.sample and (args.temperature <= 0 or not 0 < args.top_p <= 1):
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1] when sampling")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load(args.path, dtype=args.dtype, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer_for(args.path, model)
    if args.compile:
        from ..moe.compiled import compile_moe_blocks, compile_note

        note = compile_note(compile_moe_blocks(model))
        if note:
            print(note, file=sys.stderr)
    stream = not args.no_stream
    text = generate_text(
        model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=not args.no_chat_template,
        system=args.system, stream=stream, use_cache=not args.no_cache,
    )
    if not stream:
        print(text)
    return 0
