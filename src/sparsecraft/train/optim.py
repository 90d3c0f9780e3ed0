"""The optimizer a recipe names: torch's AdamW, or bitsandbytes' paged AdamW (8- or 32-bit states paged to host
memory under pressure, as the QLoRA recipe trains; CUDA only)."""

from __future__ import annotations

import torch

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "paged_adamw_32bit", "paged_adamw_8bit")


def make_optimizer(optim, params, device: torch.device) -> torch.optim.Optimizer:
    """`optim`: the recipe's `optim` section; `params`: the trainable parameters."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        return adamw(params, **kwargs)
    if device.type != "cuda":
        raise ConfigError(f"optim.name {optim.name} pages optimizer state through CUDA unified memory: it needs a "
                          "GPU (use adamw on the CPU)")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if optim.name == "paged_adamw_8bit" else bnb.optim.PagedAdamW32bit
    return cls(params, **kwargs)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, fused where every parameter allows it (float tensors on the CPU or CUDA): one pass per tensor
    instead of ~6 ops and no step-sized temporaries; on a 2-core Xeon 15 vs 45 ms per step for the quickstart's
    19.7 M trainable PESC parameters (docs/benchmarks.md). `kwargs`: AdamW's own (lr, betas, eps, weight_decay)."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, **kwargs, fused=fused or None)
