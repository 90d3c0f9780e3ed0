"""glibc's heap during CPU training: kept steady for speed (`train.steady_heap`, the default) or handed back to the
OS at a few decoder-layer boundaries for memory (`train.trim_heap`).

Steady: glibc returns freed memory to the OS (heap-top trims above 128 KiB, `munmap` of blocks above its dynamic
mmap threshold) and the next step faults the same pages in again. On the 2-core VM of docs/benchmarks.md that made
the largest batches of a PESC quickstart run take 6-12 s instead of 4 (15-16 M page faults a run); with the mmap
threshold fixed at 32 MiB (the ceiling the dynamic one climbs to) and the heap top never trimmed, the run took 189
instead of 219 s of training (dense unchanged), 11.5 M faults, peak RSS +100 MiB. The settings are `mallopt`
calls: process-wide, skipped where the user set glibc's malloc tunables in the environment.

Trimming: glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so a step's activations, gathers
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
import os
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from ..surgery import find_decoder_layers

TRIMS_PER_PASS = 4  # boundaries per forward (and as many in backward): 8 per step trimmed most of the excess
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
STEADY_MMAP_THRESHOLD = 32 * 1024 * 1024  # what glibc's dynamic threshold climbs to at most (64-bit)
STEADY_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: trim only above 2 GiB of free heap top
# a user who set any of these chose the allocator's behaviour: theirs is kept
USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None (musl, macOS, Windows: no such call)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def user_set_malloc() -> bool:
    """True when the environment tunes glibc's malloc (GLIBC_TUNABLES glibc.malloc.*, MALLOC_*_ variables)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(os.environ.get(k) for k in USER_MALLOC_ENV)


def keep_heap_steady() -> bool:
    """Fix glibc's mmap threshold at 32 MiB and stop trimming the heap top (see the module docstring), for the
    whole process. False where glibc's `mallopt` is missing or the user tuned malloc in the environment."""
    mallopt = _mallopt()
    if mallopt is None or user_set_malloc():
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD))


def set_up_heap(model: nn.Module, device: torch.device, trim: bool, steady: bool) -> str | None:
    """What a training run does with the heap on `device` (CPU only; GPUs' tensors live in the CUDA caching
    allocator): trims between `model`'s layers when `trim`, else a steady heap when `steady`. Returns a note for
    the user, or None."""
    if device.type != "cpu":
        return None
    if trim:
        if not install_heap_trims(model):
            return "note: train.trim_heap needs glibc's malloc_trim, which this C library lacks; not trimming"
        return None
    if steady:
        keep_heap_steady()
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
