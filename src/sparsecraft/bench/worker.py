"""Peak memory of one variant, measured in a process of its own.

    python -m sparsecraft.bench.worker --level block --method pesc --settings '{...BenchSettings JSON...}'

builds that single (level, method) as the bench does, runs `memory_steps` training steps and prints one JSON
line with, from `getrusage(RUSAGE_SELF).ru_maxrss` (the process's RSS high-water mark):

- `baseline_rss_bytes`: right after imports, before anything is built;
- `build_peak_rss_bytes`: after building (includes construction transients: a full-precision model before NF4
  quantisation, a whole `--model` loaded to take one FFN);
- `peak_rss_bytes`: after the steps. Where Linux lets a process reset its high-water mark
  (`/proc/self/clear_refs`, `hwm_reset: true`), it is reset after the build (freed memory returned with
  `malloc_trim`), so this is the training peak with the variant resident; otherwise it equals the whole run's.

and on CUDA `cuda_peak_bytes` (`torch.cuda.max_memory_allocated`, reset after the build likewise). One variant
per process because the high-water mark never goes down by itself: measured side by side, every variant would
report the largest one's peak. The parent drops `GLIBC_TUNABLES` for the worker so the peak is that of the
default allocator.

Trap: Linux carries `ru_maxrss` across `exec` from the process that was replaced, so a worker spawned straight
from a big bench process reports at least the bench's own peak. The worker is therefore started through
`sh -c '"$0" "$@"; exit $?'`: the shell forks a fresh process (new accounting) whose exec replaces only the
small shell. `vmhwm_bytes` (`VmHWM` of /proc/self/status, per address space) is reported as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

_RSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kilobytes on Linux


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RSS_UNIT


def vmhwm_bytes() -> int | None:
    """`VmHWM` (peak resident set of this address space) from /proc/self/status; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_in_this_process(settings_dict: dict, level: str, method: str) -> dict:
    """Build one variant, run its steps, return the peak figures (the worker's body)."""
    baseline = max_rss_bytes()
    import torch

    from .block import build_block_variants
    from .model import build_model_variants
    from .settings import BenchSettings

    settings = BenchSettings.from_dict(settings_dict)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = settings.torch_device()
    if level == "block":
        [variant] = build_block_variants(settings, [method], device)
    else:
        [variant] = build_model_variants(settings, [method], device, share_base=False)
    trims = False  # trims go between decoder layers: a model's, not a lone block's
    if settings.memory_allocator == "trim" and variant.model is not None:
        from ..train.heap import install_heap_trims

        trims = bool(install_heap_trims(variant.model))
    build_peak = max_rss_bytes()
    hwm_reset = reset_high_water_mark()
    cuda_baseline = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = int(torch.cuda.memory_allocated(device))  # the built variant's own tensors
    for _ in range(settings.memory_steps):
        variant.reset()
        variant.step()
    result = {"level": level, "method": method, "peak_rss_bytes": max_rss_bytes(), "baseline_rss_bytes": baseline,
              "build_peak_rss_bytes": build_peak, "hwm_reset": hwm_reset, "vmhwm_bytes": vmhwm_bytes(),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "heap_trims": trims}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        result["cuda_baseline_bytes"] = cuda_baseline
    return result


def reset_high_water_mark() -> bool:
    """Return freed heap to the OS, then reset this process's RSS high-water mark (Linux `clear_refs` 5, which
    `ru_maxrss` follows). False where that is not possible; the peak then includes the build."""
    import gc

    from ..train.heap import release_free_heap

    gc.collect()
    release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def measure_peak_memory(settings_dict: dict, level: str, method: str, timeout_s: float | None = None) -> dict:
    """Run the worker for one (level, method) and return its JSON; `{"error": ...}` when it fails."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)  # the default allocator's peak, not one tuned to keep memory
    if settings_dict.get("memory_allocator") == "live":
        from .settings import LIVE_ALLOCATOR_ENV

        env.update(LIVE_ALLOCATOR_ENV)
    cmd = [sys.executable, "-m", "sparsecraft.bench.worker", "--level", level, "--method", method,
           "--settings", json.dumps(settings_dict)]
    if os.path.exists("/bin/sh"):  # a fork in between: ru_maxrss must not start at this process's peak
        cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"memory worker for {level}/{method} timed out after {timeout_s} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory worker for {level}/{method} failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsecraft.bench.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--level", required=True, choices=("block", "model"))
    parser.add_argument("--method", required=True)
    parser.add_argument("--settings", required=True, help="BenchSettings as JSON")
    args = parser.parse_args(argv)
    result = measure_in_this_process(json.loads(args.settings), args.level, args.method)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
