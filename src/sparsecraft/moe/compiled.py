"""torch.compile for the MoE blocks: recipe `train.compile: true`, `--compile` for generate, serve and bench.

Each PESC block's math (router, top-k, gates, dropout, adapter dispatch, residual: `layers.pesc_math`, a pure
function) is compiled once per process with dynamic shapes and shared by every layer, so neither the layer nor
the token count (training batches, prefill, decoding one token) asks for a recompile; recording the routing for
the losses stays eager, outside the graph. The frozen FFN, attention and the rest of the model stay eager: the
blocks are where many small operations run per token (routing and gating) and where inductor can fuse them (CPU:
C++/OpenMP kernels; GPU: Triton). Under compilation the dispatch paths that read routing into Python
(`gathered`, `sorted`) are traced as masked-dense instead (`experts.traceable_path`); results equal the eager
blocks' up to rounding.
"""

from __future__ import annotations

import torch.nn as nn

from .layers import PescMoE


def compile_moe_blocks(model: nn.Module) -> int:
    """Switch every PESC block of `model` to the compiled math; returns how many. The first call compiles (tens
    of seconds on a CPU, again for the first backward); other methods' blocks stay eager."""
    count = 0
    for module in model.modules():
        if isinstance(module, PescMoE):
            module.compiled = True
            count += 1
    return count


def compile_note(count: int) -> str | None:
    """What to tell the user when compiling found nothing to compile (None when it did)."""
    if count:
        return None
    return "note: compile applies to PESC blocks and this model has none; it runs eager"
