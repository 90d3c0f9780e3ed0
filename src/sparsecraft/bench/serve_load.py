"""The serving load benchmark's client side: N concurrent streaming clients against an OpenAI-compatible server
for a bounded time, and what they measured (requests/s, generated tokens/s, time to first token, latency).

Each client sends streamed chat completions one after another with a fixed completion length (`ignore_eos`, so
every model generates the same number of tokens) and greedy decoding, and times the first content chunk and the
end of the stream. Clients start no request after `duration_s`; requests in flight finish and count. Talks only
to the URL it is given (the benchmark starts its servers on 127.0.0.1).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

PROMPTS = (
    "Explain what a mixture of experts is in two sentences.",
    "Write a haiku about sparse computation.",
    "List three prime numbers and say why they are prime.",
    "What does a bottleneck adapter do?",
    "Give a short recipe for tea.",
    "Summarise the idea of instruction tuning.",
    "Why is the sky blue?",
    "Name two sorting algorithms and their complexity.",
)


@dataclass
class RequestTiming:
    ttft_s: float
    latency_s: float
    completion_tokens: int


@dataclass
class LoadResult:
    """What one load run measured. Percentiles are over completed requests."""

    label: str
    clients: int
    wall_s: float
    requests: int
    errors: int
    generated_tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    timings: list[RequestTiming] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("timings")
        return data


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    """One streamed chat completion; times the first content chunk and the end."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestTiming((first or end) - start, end - start, tokens)


def run_load(url: str, model: str, *, clients: int = 8, duration_s: float = 30.0, max_tokens: int = 64,
             label: str = "", max_requests: int = 10_000) -> LoadResult:
    """Drive `clients` concurrent clients for `duration_s` (at most `max_requests` requests in all)."""
    import httpx

    timings: list[RequestTiming] = []
    errors = [0]
    lock = threading.Lock()
    issued = [0]
    deadline = time.perf_counter() + duration_s

    def worker(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            n = 0
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                prompt = PROMPTS[(index + n) % len(PROMPTS)]
                n += 1
                try:
                    timing = one_request(client, url, model, prompt, max_tokens)
                except Exception:  # noqa: BLE001 - counted; the run goes on
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    timings.append(timing)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(t.completion_tokens for t in timings)
    ttft = [t.ttft_s for t in timings]
    latency = [t.latency_s for t in timings]
    return LoadResult(label or model, clients, wall, len(timings), errors[0], tokens, len(timings) / wall,
                      tokens / wall, percentile(ttft, 50), percentile(ttft, 95), percentile(latency, 50),
                      percentile(latency, 95), timings)


def format_load_table(results: list[LoadResult]) -> str:
    """A Markdown table of load results; the last column is generated tokens/s relative to the first row."""
    head = ("| model | clients | requests | req/s | gen tok/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 "
            "| tok/s vs first |\n|---|---|---|---|---|---|---|---|---|---|\n")
    base = results[0].tokens_per_s if results else 0.0
    rows = []
    for r in results:
        ratio = r.tokens_per_s / base if base else float("nan")
        rows.append(f"| {r.label} | {r.clients} | {r.requests} ({r.errors} errors) | {r.requests_per_s:.2f} | "
                    f"{r.tokens_per_s:.1f} | {r.ttft_p50_s:.3f} s | {r.ttft_p95_s:.3f} s | {r.latency_p50_s:.2f} s | "
                    f"{r.latency_p95_s:.2f} s | {ratio:.3f} |")
    return head + "\n".join(rows)
