"""The serving load benchmark: a crafted model beside its dense base, each behind its own server on 127.0.0.1,
driven by the same concurrent clients for the same time (`serve_load.run_load`). How a server is started is
handed in (`start_server`), so this module needs no server code of its own."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from .serve_load import LoadResult, run_load


class Server(Protocol):
    url: str
    model_name: str

    def stop(self) -> int | None: ...


def base_of(model: str) -> str:
    """The dense base a crafted or trained sparsecraft directory refers to (its `base/` when standalone), as a
    local path `sparsecraft.load` opens."""
    from ..checkpoint.crafted import is_crafted_dir, read_config, resolve_saved_base

    if not is_crafted_dir(model):
        raise ConfigError(f"{model} is not a sparsecraft directory; name its dense base with --serve-base")
    source = resolve_saved_base(Path(model), read_config(model)["base"])
    return os.path.join(source.directory, source.gguf_file) if source.gguf_file else source.directory


def run_serve_bench(models: list[tuple[str, str]], start_server: Callable[[str], Server], *, clients: int = 8,
                    duration_s: float = 30.0, max_tokens: int = 64, warmup_requests: int = 2,
                    log: Callable[[str], None] = print) -> list[LoadResult]:
    """For each `(label, model)` in turn: start its server, warm it up, drive the load, stop it."""
    results = []
    for label, model in models:
        log(f"[{label}] starting a server for {model}")
        server = start_server(model)
        try:
            warm = run_load(server.url, server.model_name, clients=1, duration_s=0.0, max_tokens=8,
                            label="warmup", max_requests=warmup_requests)
            if warm.errors:
                raise RuntimeError(f"[{label}] the warm-up requests failed")
            log(f"[{label}] {clients} clients for {duration_s:.0f} s, {max_tokens} tokens per request")
            result = run_load(server.url, server.model_name, clients=clients, duration_s=duration_s,
                              max_tokens=max_tokens, label=label)
            results.append(result)
            log(f"[{label}] {result.requests} requests, {result.tokens_per_s:.1f} generated tokens/s")
        finally:
            server.stop()
    return results


def machine() -> dict:
    """Where the numbers were measured."""
    model_name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version()}
