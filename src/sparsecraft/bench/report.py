"""Bench output: the machine description, one JSON record per (level, method, path), and the terminal table
whose headline is each figure's ratio to `dense` at the same level."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from ..hardware import cpu_model, cpu_summary
from .settings import BASELINE


def machine_info(device: torch.device) -> dict:
    """Where and with what the figures were taken (timings only compare within one such machine and run)."""
    import transformers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cpu_cores_available": cores,
        **cpu_summary(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def add_ratios(records: list[dict]) -> None:
    """Fill `ratio_to_dense`, `flop_floor_ratio`, `flop_executed_ratio`, `peak_mem_ratio_to_dense` and the
    decode ratios of every record from the `dense` record of its level."""
    dense = {r["level"]: r for r in records if r["method"] == BASELINE}
    for rec in records:
        ref = dense.get(rec["level"], {})
        rec["ratio_to_dense"] = _ratio(rec["median_ms"], ref.get("median_ms"))
        rec["flop_floor_ratio"] = _ratio(rec["flops"], ref.get("flops"))
        rec["flop_executed_ratio"] = _ratio(rec["flops_executed"], ref.get("flops"))
        rec["peak_mem_ratio_to_dense"] = _ratio(rec["peak_mem_bytes"], ref.get("peak_mem_bytes"))
        for batch, figures in (rec.get("decode") or {}).items():
            ref_fig = (ref.get("decode") or {}).get(batch, {})
            # tokens/s: a ratio below 1 means slower than dense
            figures["tokens_per_s_ratio_to_dense"] = _ratio(figures.get("tokens_per_s"), ref_fig.get("tokens_per_s"))


def write_json(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def format_table(result: dict) -> str:
    """The terminal table: one row per record, ratios to dense first."""
    records = result["records"]
    head = ["level", "method", "path", "x dense", "median ms", "p10-p90 ms", "FLOP floor", "exec", "tokens/s",
            "peak MiB", "+MiB", "mem x"]
    has_decode = any(r.get("decode") for r in records)
    batches = sorted({int(b) for r in records for b in (r.get("decode") or {})})
    if has_decode:
        head += [f"dec b{b} tok/s" for b in batches] + ["same tokens"]
    rows = []
    for r in records:
        row = [
            r["level"], r["method"], r["path"], _fmt(r["ratio_to_dense"], ".2f"), _fmt(r["median_ms"], ".2f"),
            f"{_fmt(r['p10_ms'], '.2f')}-{_fmt(r['p90_ms'], '.2f')}", _fmt(r["flop_floor_ratio"], ".3f"),
            _fmt(r["flop_executed_ratio"], ".3f"), _fmt(r["tokens_per_s"], ".0f"), _mib(r["peak_mem_bytes"]),
            _mib(r.get("peak_mem_over_baseline_bytes")),
            _fmt(r["peak_mem_ratio_to_dense"], ".2f"),
        ]
        if has_decode:
            decode = r.get("decode") or {}
            for b in batches:
                fig = decode.get(str(b), {})
                tps, ratio = fig.get("tokens_per_s"), fig.get("tokens_per_s_ratio_to_dense")
                row.append("-" if tps is None else f"{tps:.0f} ({ratio:.2f}x)" if ratio else f"{tps:.0f}")
            same = r.get("same_tokens_as_dense")
            row.append("-" if same is None else "yes" if same else "NO")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["settings"]
    m = result["machine"]
    lines.append("")
    lines.append(
        "x dense: median step time / dense's at the same level (block: fwd+bwd; model: fwd+bwd+AdamW). "
        "FLOP floor: matmul FLOPs / dense's; exec: as the path runs them. peak MiB: RSS high-water mark "
        "(CUDA: max allocated) of a process running only that variant; +MiB: above the same process after "
        "imports (CUDA: above the built variant's allocation). path: the dispatch of the training step (auto "
        "may pick another for decode). dec tok/s: new "
        "tokens / time of generate (a short prompt's prefill included). "
        f"{s['repeats']} interleaved rounds after {s['warmup']} warm-up steps; {m['cpu']}, {m['threads']} threads, "
        f"{m.get('cpu_capability', '?')}, native bf16: {m.get('cpu_bf16') or 'no'}, torch {m['torch']}."
    )
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
