"""`sparsecraft bench`: PESC's cost next to dense, upcycling and the published per-expert loop, measured in one
process and one run with the variants interleaved round by round.

Modules:
    settings   BenchSettings (the CLI flags), model shapes, method names
    flops      matmul FLOP floors of every method (the counting rules are documented there)
    reference  LoopPescBlock: the published code's per-expert boolean-mask loop, written from the formula
    base       dense base / FFN construction, the Variant record, which dispatch path runs
    block      the MoE block alone (forward + backward)
    model      the whole LoRA-tuned model (forward + backward + AdamW) and greedy decoding
    timing     round-robin timing, medians and spreads
    worker     peak memory, one variant per process (`python -m sparsecraft.bench.worker`)
    report     machine description, JSON records, the terminal table
    runner     run_bench: the whole run
"""

from .runner import run_bench
from .settings import LEVELS, METHODS, SHAPES, BenchSettings

__all__ = ["LEVELS", "METHODS", "SHAPES", "BenchSettings", "run_bench"]
