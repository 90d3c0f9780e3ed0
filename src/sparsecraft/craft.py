"""The public crafting functions: `craft` (PESC, or any registered method), `upcycle`, `uncraft`.

Each delegates to a registered method (`methods/`); the structural work they share is `surgery.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import CraftConfig
from .errors import CraftError
from .methods import get_method, method_of
from .surgery import is_crafted


def craft(
    model: nn.Module,
    config: CraftConfig | None = None,
    *,
    seed: int | None = None,
    adapter_dtype: torch.dtype | None = None,
    method: str = "pesc",
    **overrides,
) -> nn.Module:
    """Turn the chosen FFNs of a transformers causal LM into MoE blocks of `method` (PESC by default), in place.

    Args:
        model: a transformers causal LM (any decoder family with a dense FFN per layer).
        config: crafting settings; keyword `overrides` replace individual fields.
        seed: seeds the new weights' initialisation (router and `W_down`); `W_up` is zero regardless.
        adapter_dtype: dtype of router-free adapter weights; default the model's floating dtype.
        method: a registered method that crafts from the base alone (`pesc`, `upcycle`, `mixlora`, ...).

    Returns:
        The same model object, now of a `Pesc*` subclass of its class, whose forward also returns the router
        losses. A freshly crafted model computes what the dense one did (up to rounding) until it is trained.
    """
    chosen = get_method(method)
    if not chosen.builds_moe:
        raise CraftError(f"method {method} adds no experts; nothing to craft")
    return chosen.craft(model, config, seed=seed, adapter_dtype=adapter_dtype, **overrides)


def upcycle(model: nn.Module, config: CraftConfig | None = None, *, seed: int | None = None,
            noise_std: float = 0.0, **overrides) -> nn.Module:
    """Sparse-upcycle the chosen FFNs (E trainable FFN copies behind a router), in place; see
    `methods.upcycle.UpcycleMethod.craft`."""
    return get_method("upcycle").craft(model, config, seed=seed, noise_std=noise_std, **overrides)


def uncraft(model: nn.Module) -> nn.Module:
    """Remove every MoE block and return the dense model (in place), where the method keeps the dense FFN."""
    if not is_crafted(model):
        raise CraftError("model is not crafted")
    return method_of(model).uncraft(model)
