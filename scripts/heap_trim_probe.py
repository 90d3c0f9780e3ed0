"""Would returning freed heap to the OS between decoder layers meet the memory target? (speed issue, item 5)

glibc keeps freed heap resident; peak RSS of a training step then counts fragmentation. This probe installs
`train.trim_heap`'s trims (`sparsecraft.train.heap`: `malloc_trim(0)` after the forward of PER_PASS evenly spaced
decoder layers and again when their output gradients arrive in backward) on the bench's model-level step
(SmolLM2 shape, 4 x 256 tokens, fp32, one thread):

    python scripts/heap_trim_probe.py memory METHOD PER_PASS   # peak RSS of 3 steps, one process per setting
    python scripts/heap_trim_probe.py time METHOD PER_PASS     # steps with and without the trims, interleaved

PER_PASS=0 turns the trims off (4 is what `train.trim_heap` uses). Prints one JSON line. Start memory runs through
`sh -c` so that `ru_maxrss` starts fresh (see sparsecraft/bench/worker.py) and without GLIBC_TUNABLES.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from sparsecraft.bench.model import build_model_variants
from sparsecraft.bench.settings import BenchSettings
from sparsecraft.bench.worker import max_rss_bytes, reset_high_water_mark
from sparsecraft.train import heap


def main(mode: str, method: str, per_pass: int) -> dict:
    settings = BenchSettings(levels=["model"], methods=[method], batch_size=4, seq_len=256, repeats=1, warmup=0,
                             decode_tokens=0, threads=1)
    [variant] = build_model_variants(settings, [method], torch.device("cpu"), share_base=False)
    state = {"calls": 0, "seconds": 0.0}
    release = heap.release_free_heap

    def timed_release() -> bool:  # the hooks call the module's function: count and time each trim
        start = time.perf_counter()
        done = release()
        state["seconds"] += time.perf_counter() - start
        state["calls"] += 1
        return done

    heap.release_free_heap = timed_release
    install = (lambda: heap.install_heap_trims(variant.model, per_pass)) if per_pass > 0 else list
    if mode == "memory":
        install()
        reset_high_water_mark()
        state["calls"] = 0
        for _ in range(3):
            variant.reset()
            variant.step()
        return {"mode": mode, "method": method, "per_pass": per_pass, "peak_mib": round(max_rss_bytes() / 2**20),
                "trims_per_step": state["calls"] / 3}
    variant.reset()
    variant.step()  # warm-up
    seconds = {False: [], True: []}
    trim_seconds = []
    for round_ in range(4):  # alternate which setting goes first
        for on in ((False, True) if round_ % 2 == 0 else (True, False)):
            handles = install() if on else []
            state["seconds"] = 0.0
            variant.reset()
            start = time.perf_counter()
            variant.step()
            seconds[on].append(time.perf_counter() - start)
            for handle in handles:
                handle.remove()
            if on:
                trim_seconds.append(state["seconds"])
    return {"mode": mode, "method": method, "per_pass": per_pass, "step_s_off": seconds[False],
            "step_s_on": seconds[True], "trim_call_s": trim_seconds,
            "ratio": statistics.median(seconds[True]) / statistics.median(seconds[False])}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
