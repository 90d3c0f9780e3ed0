"""Round-robin timing: every variant is timed once per round, so machine noise (other jobs, frequency changes,
first-touch memory) hits all of them alike; the figures are medians with a (p10, p90) spread.

Order: warm up each variant `warmup` times, then `for r in rounds: for v in variants: zero_grad; sync; t0;
step; sync; t1`. The garbage collector is paused while rounds run so a collection never lands in one step.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Timed:
    """One thing to time: `step()` is measured, `reset()` (zero_grad) runs untimed before it."""

    name: str
    step: Callable[[], object]
    reset: Callable[[], None] = lambda: None
    times_s: list = field(default_factory=list)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """`torch.cuda.synchronize` on CUDA (kernels are asynchronous), a no-op on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def round_robin(items: Sequence[Timed], rounds: int, warmup: int, sync: Callable[[], None],
                progress: bool = True, desc: str = "rounds") -> None:
    """Fill each item's `times_s` with `rounds` interleaved measurements after `warmup` untimed steps each."""
    for item in items:
        for _ in range(warmup):
            item.reset()
            item.step()
    sync()
    bar = _progress(rounds, progress, desc)
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for item in items:
                item.reset()
                sync()
                start = time.perf_counter()
                item.step()
                sync()
                item.times_s.append(time.perf_counter() - start)
            bar.update(1)
    finally:
        if was_enabled:
            gc.enable()
        bar.close()


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="round")


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default rule) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(times_s: Sequence[float]) -> dict:
    """`median_ms`, `p10_ms`, `p90_ms` and every time in ms (None figures when nothing was timed)."""
    if not times_s:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None, "times_ms": []}
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": quantile(ms, 0.5), "p10_ms": quantile(ms, 0.1), "p90_ms": quantile(ms, 0.9),
            "times_ms": [round(t, 4) for t in ms]}
