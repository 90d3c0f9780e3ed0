"""The up-projections of all experts laid side by side, `[E*r, h]`, kept while the weights do not change.

The masked-dense path ends with `a [N, E*r] @ U`, where row `e*r + j` of `U` is `up[e, :, j]`. `up` is stored
`[E, h, r]` (each expert an `nn.Linear`-shaped `[h, r]`), so `U` is a transposed copy, not a view: training
makes that copy on every call (amortised over many tokens), and a decoding step of one token either pays
the copy or runs one small matmul per expert and sums them (`bmm` + `sum`: 47 vs 18 us at 8 tokens,
SmolLM2 shapes). Under `torch.inference_mode` (generation, serving) the copy is made once and kept on the
parameter, keyed by the parameter's version counter, storage, dtype and device, so that any in-place update
(optimizer step, `load_state_dict`, `copy_`) or a move drops it; switching the module to training drops it too
(`forget_stacked_up`), which covers sharded engines that swap a parameter's storage in place between steps.
It costs one more copy of `up` in memory, so it is kept only up to `MAX_CACHED_BYTES` per layer (the
SmolLM2-135M quickstart's is 1.2 MB; a 7B model's r=512 experts, 64 MiB per layer, are left to the per-call
paths, where decoding is bound by reading the weights either way).
"""

from __future__ import annotations

import torch
import torch.nn as nn

MAX_CACHED_BYTES = 16 * 1024 * 1024
_ATTRIBUTE = "_sparsecraft_stacked_up"


def stack_up(up: torch.Tensor) -> torch.Tensor:
    """`up: [E, h, r]` -> `[E*r, h]` with row `e*r + j` = `up[e, :, j]` (a copy; differentiable)."""
    num_experts, hidden, adapter_dim = up.shape
    return up.transpose(1, 2).reshape(num_experts * adapter_dim, hidden)


def cached_stacked_up(up: torch.Tensor) -> torch.Tensor | None:
    """`stack_up(up)` made once and reused while `up` (a parameter) is unchanged; None where caching does not
    apply: outside inference mode or under torch.compile, `up` a temporary (a dtype cast), an inference tensor
    itself (no version counter) or larger than `MAX_CACHED_BYTES`."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():  # traced: no Python-side state
        return None
    if not isinstance(up, nn.Parameter) or up.is_inference() or up.is_meta:
        return None
    if up.numel() * up.element_size() > MAX_CACHED_BYTES:
        return None
    key = (up._version, up.data_ptr(), up.dtype, up.device)
    found = getattr(up, _ATTRIBUTE, None)
    if found is not None and found[0] == key:
        return found[1]
    stacked = stack_up(up.detach()).contiguous()
    setattr(up, _ATTRIBUTE, (key, stacked))
    return stacked


def forget_stacked_up(up: torch.Tensor) -> None:
    """Drop the kept layout of `up`, if any (the module is switched to training)."""
    if hasattr(up, _ATTRIBUTE):
        delattr(up, _ATTRIBUTE)
