"""Choosing a dispatch path by measurement: a short timed probe per call shape, cached for the process.

Which way of computing the routed adapters is fastest depends on the machine (cores, vector units, GPU), the
dtype and the shape, and a fixed threshold gets it wrong somewhere (docs/benchmarks.md: the shape rule picks the
masked-dense path at the quickstart's E=8, r=64 and computes all eight experts on every token). So the first
call of each shape times the candidate paths on synthetic inputs of that shape, forward only or forward and
backward as the call will be, and every later call of the shape reuses the winner.

- The key is (token bucket, E, k, r, h, dtype, device, training); token counts are bucketed to powers of two
  so that batches of varying length share a probe.
- Synthetic values come from a private generator: probing never moves the global random stream, so a
  seeded run stays reproducible whichever path wins. The expert choices are the call's own with an eighth of the
  tokens drawn again, `ROUTINGS` times: a real router's are uneven, which decides how the paths that group tokens
  by expert fare, and they change from batch to batch. Each path first runs through all of these routings
  untimed, then is timed on them again: a steady state, as after a few training steps, where oneDNN's bf16
  kernels exist for the shapes the routings produce (it builds one per new matmul shape, 2.7 ms; the grouped and
  padded kernels pad their groups to whole tiles in bf16 so that the shapes repeat, and timing each path's first
  calls would charge it for kernels a run builds once).
- The timing runs in the caller's thread, under saved-tensor hooks of its own that keep tensors as they are:
  activation checkpointing, which counts the tensors a forward saves and replays it later (when the cache
  answers), never sees the probe's. (Grad mode, inference mode and autocast are set per call by `run`.) Not in a
  thread of its own, which it once did: on the CPU, a second thread's OpenMP team runs elementwise ops at about
  half speed beside the idle first one (`add_` 261 vs 167 us; the grouped path 10.1 vs 5.6 ms per layer, the
  masked-dense one 5.5 vs 4.4), which misjudged the paths with many small ops. Only where the caller has torch
  function or dispatch modes active (FSDP, fake tensors, selective checkpointing), which the probe must not
  run under, or has saved-tensor hooks disabled, is a short-lived thread used, where none of that applies.
- `dispatch: rule` (the shape rule, no timing) opts out, for bit-for-bit reproducible path choices; inside
  `torch.compile` tracing the rule is used too.
- Training checkpoints carry the choices made so far (`export` / `restore`), so a resumed run computes its
  shapes the way the interrupted one did.

The timer is injectable so that tests decide the winner.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ProbeKey = tuple  # JSON-able scalars only (ints, strings, bools), so that choices can be saved
Timer = Callable[[], float]


@dataclass(frozen=True)
class ProbeResult:
    """The winner of one probe and every candidate's median seconds per call."""

    path: str
    seconds: dict[str, float]


def token_bucket(num_tokens: int) -> int:
    """The power of two at or above `num_tokens` (1 for 0 or 1)."""
    return 1 << max(num_tokens - 1, 0).bit_length()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DispatchProbe:
    """Times candidate paths once per key and remembers the fastest."""

    def __init__(self, repeats: int = 3, timer: Timer = time.perf_counter, min_seconds: float = 2e-3,
                 max_repeats: int = 25, warmup: int = 1):
        """`warmup` untimed calls per candidate, then `repeats` timed calls at least; calls so short that these
        take under `min_seconds` in all are repeated further, up to `max_repeats` (a decoding step's ~100 us
        calls: 3 samples are noise)."""
        self.warmup = warmup
        self.repeats = repeats
        self.timer = timer
        self.min_seconds = min_seconds
        self.max_repeats = max_repeats
        self._results: dict[ProbeKey, ProbeResult] = {}
        self._lock = threading.Lock()

    def results(self) -> dict[ProbeKey, ProbeResult]:
        """A copy of what has been measured so far, key -> result."""
        with self._lock:
            return dict(self._results)

    def cached(self, key: ProbeKey) -> str | None:
        """The path chosen for `key` so far, or None (no copy of the table: this runs on every call)."""
        with self._lock:
            found = self._results.get(key)
        return found.path if found is not None else None

    def clear(self) -> None:
        with self._lock:
            self._results.clear()

    def export(self) -> list[dict]:
        """The choices made so far, as JSON-able records."""
        with self._lock:
            return [{"key": list(key), "path": r.path, "seconds": dict(r.seconds)}
                    for key, r in self._results.items()]

    def restore(self, records: list[dict]) -> None:
        """Adopt saved choices (from `export`), replacing any measured here for the same keys."""
        with self._lock:
            for record in records:
                self._results[tuple(record["key"])] = ProbeResult(record["path"], dict(record.get("seconds", {})))

    def choose(self, key: ProbeKey, candidates: Sequence[str], run: Callable[[str], None],
               device: torch.device) -> str:
        """The fastest of `candidates` for `key`: measured with `run(path)` the first time, then cached.

        `run(path)` computes one call of the shape with that path (and its backward when training). Each
        candidate runs `warmup` times untimed (allocator, kernel generation), then `repeats` timed times.
        """
        found = self.cached(key)
        if found is not None:
            return found
        if len(candidates) == 1:
            result = ProbeResult(candidates[0], {})
        else:
            seconds = self._time_all(candidates, run, device)
            result = ProbeResult(min(candidates, key=lambda p: seconds[p]), seconds)
        with self._lock:
            self._results.setdefault(key, result)
        return result.path

    def _time_all(self, candidates: Sequence[str], run: Callable[[str], None], device: torch.device
                  ) -> dict[str, float]:
        """Median seconds per call of each candidate, timed in this thread where that is safe (see above)."""
        def time_all() -> dict[str, float]:
            return {path: self._time(run, path, device) for path in candidates}

        if not _modes_active():
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is))
                except RuntimeError:  # saved-tensor hooks disabled by the caller: time in a thread
                    pass
                else:
                    return time_all()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsecraft-probe") as pool:
            return pool.submit(time_all).result()

    def _time(self, run: Callable[[str], None], path: str, device: torch.device) -> float:
        for _ in range(self.warmup):
            run(path)
        _sync(device)
        samples: list[float] = []
        while len(samples) < self.repeats or (sum(samples) < self.min_seconds and len(samples) < self.max_repeats):
            start = self.timer()
            run(path)
            _sync(device)
            samples.append(self.timer() - start)
        return statistics.median(samples)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _modes_active() -> bool:
    """Whether torch function or dispatch modes are active in this thread (the probe then times in another)."""
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # moved in some torch release: take the thread, which is always safe
        return True
    return bool(_get_current_function_mode_stack()) or bool(_get_current_dispatch_mode_stack())


# Routings a probe prepares per call shape (the call's own, an eighth of the tokens drawn again in each); every
# path is warmed on all of them, then timed on them again.
ROUTINGS = 8

# One probe per process: every crafted layer of every model shares what was measured.
PROBE = DispatchProbe(warmup=ROUTINGS)
