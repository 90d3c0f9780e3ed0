"""The serving load benchmark: a crafted model beside its dense base, each behind its own server on 127.0.0.1,
driven by the same concurrent clients for the same time (`serve_load.run_load`), in alternating rounds. How a
server is started is handed in (`start_server`), so this module needs no server code of its own."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import ConfigError
from .serve_load import LoadResult, percentile, run_load


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
                    duration_s: float = 30.0, max_tokens: int = 64, rounds: int = 3, warmup_requests: int = 2,
                    log: Callable[[str], None] = print) -> list[LoadResult]:
    """Serve every `(label, model)` at once, then drive the load in `rounds` rounds, one model after the other
    in each round (`duration_s / rounds` seconds a turn), so that a change in the machine's load over the run
    falls on all models alike. Returns one merged result per model."""
    servers: list[Server] = []
    try:
        for label, model in models:
            log(f"[{label}] starting a server for {model}")
            servers.append(start_server(model))
        for (label, _), server in zip(models, servers):
            warm = run_load(server.url, server.model_name, clients=1, duration_s=600.0, max_tokens=8,
                            label="warmup", max_requests=warmup_requests)
            if warm.errors or not warm.requests:
                raise RuntimeError(f"[{label}] the warm-up requests failed")
        turns: dict[str, list[LoadResult]] = {label: [] for label, _ in models}
        for r in range(rounds):
            for (label, _), server in zip(models, servers):
                result = run_load(server.url, server.model_name, clients=clients, duration_s=duration_s / rounds,
                                  max_tokens=max_tokens, label=label)
                turns[label].append(result)
                log(f"[{label}] round {r + 1}/{rounds}: {result.requests} requests, "
                    f"{result.tokens_per_s:.1f} generated tokens/s")
    finally:
        for server in servers:
            server.stop()
    return [merge(label, turns[label]) for label, _ in models]


def merge(label: str, parts: list[LoadResult]) -> LoadResult:
    """One result from several turns of the same load: totals over the summed wall time, percentiles over all
    requests."""
    timings = [t for p in parts for t in p.timings]
    wall = sum(p.wall_s for p in parts)
    tokens = sum(t.completion_tokens for t in timings)
    ttft, latency = [t.ttft_s for t in timings], [t.latency_s for t in timings]
    return LoadResult(label, parts[0].clients, wall, len(timings), sum(p.errors for p in parts), tokens,
                      len(timings) / wall, tokens / wall, percentile(ttft, 50), percentile(ttft, 95),
                      percentile(latency, 50), percentile(latency, 95), timings)


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
