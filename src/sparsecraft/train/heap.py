"""Hand freed heap back to the OS at a few decoder-layer boundaries of a CPU training step (`train.trim_heap`).

Why: glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so a step's activations, gathers
and gradient buffers come from the heap, and freed heap between live blocks stays resident. Peak RSS then counts
that fragmentation: at the SmolLM2 shape (4 x 256 tokens, fp32) ~0.7 GiB of dense's step and ~1 GiB of PESC's.
`malloc_trim(0)` after the forward of every few layers and again when their gradients arrive in backward gives the
free pages back; measured there (docs/benchmarks.md): dense 4,030 -> 3,388 MiB, PESC 4,743 -> 3,786 MiB, at
1.10x (dense) and 1.22x (PESC) the step time, since the pages are faulted in again. So it is opt-in, for CPU runs
short of memory; GPUs keep their tensors in the CUDA caching allocator and are not touched.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..surgery import find_decoder_layers

TRIMS_PER_PASS = 4  # boundaries per forward (and as many in backward): 8 per step trimmed most of the excess


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (musl, macOS, Windows: no such call)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def heap_trim_available() -> bool:
    return _malloc_trim() is not None


def release_free_heap() -> bool:
    """Return the free pages of every malloc arena to the OS; False where the C library has no `malloc_trim`."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def trim_layer_indices(num_layers: int, per_pass: int = TRIMS_PER_PASS) -> list[int]:
    """Indices of the decoder layers after which the heap is trimmed: evenly spaced, at most `per_pass`."""
    every = max(1, math.ceil(num_layers / per_pass))
    return list(range(0, num_layers, every))


def _trim_in_backward(grad: torch.Tensor) -> None:
    release_free_heap()


def _trim_after_forward(module: nn.Module, inputs: tuple, output) -> None:
    if not module.training:  # evaluation and decoding run untouched
        return
    release_free_heap()
    hidden = output[0] if isinstance(output, tuple) else output
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(_trim_in_backward)  # fires when this layer's output gradient is ready


def install_heap_trims(model: nn.Module, per_pass: int = TRIMS_PER_PASS) -> list[RemovableHandle]:
    """Trim the heap after `per_pass` evenly spaced decoder layers of `model` in training mode, forward and
    backward. Returns the hook handles (`.remove()` undoes it); [] where glibc's `malloc_trim` is missing."""
    if not heap_trim_available():
        return []
    _, layers = find_decoder_layers(model)
    return [layers[i].register_forward_hook(_trim_after_forward) for i in trim_layer_indices(len(layers), per_pass)]
