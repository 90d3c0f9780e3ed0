"""The adapters' activations by name, with exact GELU made cheap for the few rows of a decoding step.

On the CPU, torch computes exact GELU through oneDNN whenever oneDNN is on; that call has a fixed cost of ~7 us
(measured on a 2-core Xeon: 8.4 us for one [1, 512] row against 1.1 us in ATen's own kernel; the two kernels
agree to an ulp). Decoding calls it once or twice per layer per token on a few hundred values, so below
`NATIVE_GELU_MAX` elements the ATen kernel is used instead; above it oneDNN is faster (396 vs 638 us at
[4096, 512]) and is left to do it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# at and below this many elements ATen's GELU beats oneDNN's on the CPU (8192: 6.4 vs 11.6 us; 65536: equal)
NATIVE_GELU_MAX = 8192


def gelu_exact(t: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, elementwise on any shape; small CPU tensors skip oneDNN's fixed per-call cost."""
    if (torch.compiler.is_compiling() or t.device.type != "cpu" or t.numel() > NATIVE_GELU_MAX
            or not torch.backends.mkldnn.enabled):
        return F.gelu(t)
    # a process-wide switch, flipped back at once: another thread's oneDNN call in between only runs slower
    torch.backends.mkldnn.enabled = False
    try:
        return F.gelu(t)
    finally:
        torch.backends.mkldnn.enabled = True


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation_with_vjp(act: Callable[[torch.Tensor], torch.Tensor], pre: torch.Tensor
                         ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """`act(pre)` (detached) and its vector-Jacobian product `d act -> d pre`, for the custom backwards that save
    only the pre-activation: the activation is recomputed once under autograd, whatever it is."""
    with torch.enable_grad():
        pre_ = pre.detach().requires_grad_(True)
        activated = act(pre_)

    def vjp(grad: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(activated, pre_, grad)[0]

    return activated.detach(), vjp


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation called `name` (one of `ACTIVATIONS`)."""
    return ACTIVATIONS[name]
