"""Would returning freed heap to the OS between decoder layers meet the memory target? (speed issue, item 5)

glibc keeps freed heap resident; peak RSS of a training step then counts fragmentation. This probe calls
`malloc_trim(0)` after the forward of every EVERY-th decoder layer and again when its output's gradient arrives
in backward, on the bench's model-level step (SmolLM2 shape, 4 x 256 tokens, fp32, one thread):

    python scripts/heap_trim_probe.py memory METHOD EVERY   # peak RSS of 3 steps, run one process per setting
    python scripts/heap_trim_probe.py time METHOD EVERY     # steps with and without the trims, interleaved

EVERY=0 turns the trims off. Prints one JSON line. Start memory runs through `sh -c` so that `ru_maxrss` starts
fresh (see sparsecraft/bench/worker.py) and without GLIBC_TUNABLES.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import torch

from sparsecraft.bench.model import build_model_variants
from sparsecraft.bench.settings import BenchSettings
from sparsecraft.bench.worker import max_rss_bytes, reset_high_water_mark
from sparsecraft.surgery import find_decoder_layers


def main(mode: str, method: str, every: int) -> dict:
    settings = BenchSettings(levels=["model"], methods=[method], batch_size=4, seq_len=256, repeats=1, warmup=0,
                             decode_tokens=0, threads=1)
    [variant] = build_model_variants(settings, [method], torch.device("cpu"), share_base=False)
    libc = ctypes.CDLL("libc.so.6")
    state = {"on": every > 0, "calls": 0, "seconds": 0.0}

    def trim(*_):
        if state["on"]:
            start = time.perf_counter()
            libc.malloc_trim(0)
            state["seconds"] += time.perf_counter() - start
            state["calls"] += 1

    def after_forward(module, inputs, output):
        trim()
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(trim)

    if every > 0:
        _, layers = find_decoder_layers(variant.model)
        for index, layer in enumerate(layers):
            if index % every == 0:
                layer.register_forward_hook(after_forward)
    if mode == "memory":
        reset_high_water_mark()
        for _ in range(3):
            variant.reset()
            variant.step()
        return {"mode": mode, "method": method, "every": every, "peak_mib": round(max_rss_bytes() / 2**20),
                "trims_per_step": state["calls"] / 3}
    variant.reset()
    variant.step()  # warm-up
    seconds = {False: [], True: []}
    trim_seconds = []
    for round_ in range(4):  # alternate which setting goes first
        for on in ((False, True) if round_ % 2 == 0 else (True, False)):
            state["on"], state["seconds"] = on, 0.0
            variant.reset()
            start = time.perf_counter()
            variant.step()
            seconds[on].append(time.perf_counter() - start)
            if on:
                trim_seconds.append(state["seconds"])
    return {"mode": mode, "method": method, "every": every, "step_s_off": seconds[False], "step_s_on": seconds[True],
            "trim_call_s": trim_seconds, "ratio": statistics.median(seconds[True]) / statistics.median(seconds[False])}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
