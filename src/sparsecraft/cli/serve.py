"""`sparsecraft serve MODEL`: an OpenAI-compatible HTTP server (chat and text completions, streaming, batching)."""

from __future__ import annotations

import sys

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Concurrent "
                    "requests are decoded together (continuous batching). Ctrl-C or SIGTERM drains the requests "
                    "in flight, then exits.")
    p.add_argument("model", help="crafted/trained/published/dense directory, .gguf file, built-in name or hub ID")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the id clients send as `model` (default: MODEL)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as loaded)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: as loaded)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="padded prompt tokens per prefill")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--log-level", default="info", help="critical, error, warning, info (default) or debug")
    p.add_argument("--compile", action="store_true",
                   help="run the PESC blocks under torch.compile (compiled while loading, before serving)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)")
    p.set_defaults(run=run)


def settings_from_args(args):
    from ..serve.settings import ServeSettings

    return ServeSettings(
        model=args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
        dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
        max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout, threads=args.threads,
        log_level=args.log_level, compile=args.compile)


def run(args) -> int:
    try:
        from ..serve.server import serve
    except ImportError as exc:
        raise ConfigError(f"sparsecraft serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'sparsecraft[serve]'") from None
    settings = settings_from_args(args).validate()

    def ready(url: str) -> None:
        print(f"serving {settings.model_name} at {url}/v1 (Ctrl-C drains and stops)", flush=True)

    print(f"loading {settings.model} ...", file=sys.stderr, flush=True)
    return serve(settings, on_ready=ready)
