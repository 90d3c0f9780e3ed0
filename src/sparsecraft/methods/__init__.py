"""Methods: each module is one way of crafting a model, registered here by name, in the order reports list them.

To add a method: write `methods/NAME.py` with a `Method` subclass (see `base.py` and docs/adding-a-method.md)
and add it to `_REGISTERED` below. Everything else (recipes, checkpoints, the CLI, reports, routes, bench, UpIT's
expert kinds) finds it through `get_method` / `method_of`.
"""

from __future__ import annotations

from .base import Method
from .dense import DenseMethod
from .lora_experts import LoraExpertsMethod
from .mixlora import MixLoraMethod
from .pesc import PescMethod
from .registry import (
    dense_method,
    expert_kinds,
    get_method,
    method_for_kind,
    method_names,
    method_of,
    method_order,
    register,
)
from .upcycle import UpcycleMethod
from .upit import UpitMethod

_REGISTERED = (DenseMethod(), UpcycleMethod(), PescMethod(), UpitMethod(), MixLoraMethod(), LoraExpertsMethod())
for _method in _REGISTERED:
    register(_method)

__all__ = ["Method", "dense_method", "expert_kinds", "get_method", "method_for_kind", "method_names", "method_of",
           "method_order", "register"]
