"""One bench run: per level, build all variants, (model level) decode check and decode timing, interleaved
training-step timing, then peak memory one variant per worker process; records and ratios at the end."""

from __future__ import annotations

import gc
import os
import traceback

import torch

from .base import Variant
from .report import add_ratios, machine_info
from .settings import BASELINE, BenchSettings
from .timing import Timed, round_robin, summary_ms, synchronizer


def run_bench(settings: BenchSettings, progress: bool = True, log=print) -> dict:
    """Measure every (level, method) of `settings`; returns `{"settings", "machine", "records", "notes"}`."""
    settings.validate()
    notes = []
    if BASELINE not in settings.methods:  # ratios to dense are the headline
        settings.methods = [BASELINE] + list(settings.methods)
        notes.append(f"{BASELINE} added: every ratio is taken to it")
    settings.methods = list(dict.fromkeys(settings.methods))
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run(settings, notes, progress, log)
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) get their setting back


def _run(settings: BenchSettings, notes: list, progress: bool, log) -> dict:
    device = settings.torch_device()
    if device.type == "cpu" and not os.environ.get("GLIBC_TUNABLES"):
        notes.append("GLIBC_TUNABLES unset: allocation-heavy steps may swing with first-touch memory; for stable CPU "
                     "timings start with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:"
                     "glibc.malloc.trim_threshold=68719476736")
    if settings.four_bit and "block" in settings.levels:
        notes.append("--4bit applies to the model level only; the block level ran unquantised")
    machine = machine_info(device)
    machine["load_average_start"] = _load_average()  # other jobs on the machine: the main source of noise
    records = []
    for level in settings.levels:
        log(f"[{level}] building {len(settings.methods)} variants ...")
        variants = _build(settings, level, device)
        # decoding first: its token check needs the weights as built (a training step moves them)
        decode = _decode(settings, variants, device, progress, log) if level == "model" else {}
        variants = _runnable(variants, notes, log)
        timed = [Timed(f"{v.level}/{v.method}", v.step, v.reset) for v in variants]
        log(f"[{level}] timing: {settings.warmup} warm-up step(s) each, {settings.repeats} interleaved rounds")
        round_robin(timed, settings.repeats, settings.warmup, synchronizer(device), progress, desc=f"{level} rounds")
        for v, t in zip(variants, timed):
            records.append(_record(v, t, decode.get(v.method)))
        del variants, timed  # free this level before the memory workers and the next level run
        gc.collect()
        if settings.memory:
            _memory(settings, level, [r for r in records if r["level"] == level], device, log)
    add_ratios(records)
    machine["load_average_end"] = _load_average()
    result = {"settings": settings.to_dict(), "machine": machine, "records": records, "notes": notes}
    for rec in records:  # each record stands on its own (results of several runs can be concatenated)
        rec["settings"], rec["machine"] = result["settings"], machine
    return result


def _runnable(variants: list[Variant], notes: list, log) -> list[Variant]:
    """The variants whose first step runs; one that fails is left out with a note and its traceback printed (a
    failing path should not cost the whole run its other numbers). The baseline failing is an error."""
    kept = []
    for v in variants:
        try:
            v.reset()
            v.step()
        except Exception as exc:  # noqa: BLE001 - any failure of one variant is reported, the rest still run
            if v.method == BASELINE:
                raise
            log(f"[{v.level}] {v.method} left out: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            notes.append(f"{v.level}/{v.method} left out: {type(exc).__name__}: {exc}")
            continue
        kept.append(v)
    return kept


def _build(settings: BenchSettings, level: str, device: torch.device) -> list[Variant]:
    if level == "block":
        from .block import build_block_variants

        return build_block_variants(settings, settings.methods, device)
    from .model import build_model_variants

    return build_model_variants(settings, settings.methods, device)


def _decode(settings: BenchSettings, variants: list[Variant], device: torch.device, progress: bool, log) -> dict:
    """Greedy decode per batch size: the first call of each variant is the warm-up and the token check against
    dense (all variants at init: W_up = 0 and LoRA B = 0), then interleaved timed rounds."""
    from .model import greedy_decode, prompt_ids

    if settings.decode_tokens <= 0 or not variants:
        return {}
    for v in variants:
        v.model.eval()
    try:
        vocab = variants[0].extra["vocab"]
        prompts = {b: prompt_ids(settings, b, vocab, device) for b in settings.decode_batches}
        tokens = {(v.method, b): greedy_decode(v, prompts[b], settings.decode_tokens, settings, device)
                  for v in variants for b in prompts}
        timed = [
            Timed(f"{v.method}/b{b}", (lambda v=v, b=b: greedy_decode(v, prompts[b], settings.decode_tokens,
                                                                      settings, device)))
            for v in variants for b in prompts
        ]
        log(f"[model] decode: {settings.decode_tokens} tokens at batch {', '.join(map(str, prompts))}, "
            f"{settings.decode_repeats} interleaved rounds")
        round_robin(timed, settings.decode_repeats, 0, synchronizer(device), progress, desc="decode rounds")
    finally:
        for v in variants:
            v.model.train()
    out = {}
    for v in variants:
        figures = {}
        for b in prompts:
            t = next(t for t in timed if t.name == f"{v.method}/b{b}")
            s = summary_ms(t.times_s)
            tps = None if s["median_ms"] is None else b * settings.decode_tokens / (s["median_ms"] / 1e3)
            figures[str(b)] = {"median_ms": s["median_ms"], "p10_ms": s["p10_ms"], "p90_ms": s["p90_ms"],
                               "tokens_per_s": tps, "new_tokens": settings.decode_tokens,
                               "prompt_tokens": prompts[b].shape[1]}
        same = all(torch.equal(tokens[(v.method, b)], tokens[(BASELINE, b)]) for b in prompts)
        out[v.method] = {"decode": figures, "same_tokens_as_dense": same}
    return out


def _record(v: Variant, t: Timed, decode: dict | None) -> dict:
    s = summary_ms(t.times_s)
    path = v.path_run()  # after timing: `auto` is decided by the first call
    rec = {
        "level": v.level, "method": v.method, "path": path, "tokens_per_step": v.tokens,
        "median_ms": s["median_ms"], "p10_ms": s["p10_ms"], "p90_ms": s["p90_ms"], "times_ms": s["times_ms"],
        "tokens_per_s": None if not s["median_ms"] else v.tokens / (s["median_ms"] / 1e3),
        "flops": v.flops, "flops_executed": v.flops_for_path(path),
        "peak_mem_bytes": None, "peak_rss_bytes": None, "mem_baseline_bytes": None,
        "peak_mem_over_baseline_bytes": None, "mem_error": None,
    }
    if "trainable_params" in v.extra:
        rec["trainable_params"] = v.extra["trainable_params"]
    if decode is not None:
        rec.update(decode)
    return rec


def _memory(settings: BenchSettings, level: str, records: list[dict], device: torch.device, log) -> None:
    from .worker import measure_peak_memory  # not at import: `python -m ...worker` must not find it loaded

    log(f"[{level}] peak memory: one worker process per variant ({len(records)})")
    for rec in records:
        got = measure_peak_memory(settings.to_dict(), level, rec["method"])
        if "error" in got:
            rec["mem_error"] = got["error"]
            log(f"  {rec['method']}: {got['error']}")
            continue
        trim_off = settings.memory_allocator == "trim" and not got.get("heap_trims")
        rec["mem_allocator"] = "default (no layers to trim between)" if trim_off else settings.memory_allocator
        rec["malloc_mmap_threshold"] = got.get("malloc_mmap_threshold")
        rec["peak_mem_bytes"] = got.get("cuda_peak_bytes") if device.type == "cuda" else got["peak_rss_bytes"]
        rec["mem_baseline_bytes"] = got["baseline_rss_bytes"]
        rec["peak_rss_bytes"] = got["peak_rss_bytes"]
        rec["build_peak_rss_bytes"] = got.get("build_peak_rss_bytes")
        rec["mem_hwm_reset"] = got.get("hwm_reset")
        rec["vmhwm_bytes"] = got.get("vmhwm_bytes")
        # what the variant's steps added: on CUDA over the built variant's GPU memory; on the CPU, the RSS high-water
        # mark minus the one after imports
        if device.type == "cuda":
            rec["peak_mem_over_baseline_bytes"] = got["cuda_peak_bytes"] - got["cuda_baseline_bytes"]
        else:
            rec["peak_mem_over_baseline_bytes"] = got["peak_rss_bytes"] - got["baseline_rss_bytes"]


def _load_average() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
