"""The method registry: names -> `Method` objects, and the look-ups everything else uses.

Registration happens once, in `methods/__init__.py`; nothing outside `methods/` compares method names.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import ConfigError
from ..surgery import method_name_of
from .base import Method

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method under `method.name` (a second method with that name is refused)."""
    if not method.name:
        raise ValueError(f"{type(method).__name__} has no name")
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names(*, crafts: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order. `crafts=True`: methods that build a MoE from the base alone
    (what `sparsecraft craft` and the dry run offer)."""
    out = []
    for name, method in _METHODS.items():
        if crafts is not None and (method.builds_moe and method.crafts_from_base) != crafts:
            continue
        out.append(name)
    return tuple(out)


def get_method(name: str, *, what: str = "method") -> Method:
    """The method registered as `name`; ConfigError naming the choices otherwise."""
    method = _METHODS.get(name)
    if method is None:
        raise ConfigError(f"{what} must be one of {', '.join(_METHODS)}; got {name!r}")
    return method


def dense_method() -> Method:
    """The method of a model nothing was added to (the first registered method that builds no MoE)."""
    return next(m for m in _METHODS.values() if not m.builds_moe)


def method_of(model: nn.Module) -> Method:
    """The method that crafted `model`, or the dense method for a model sparsecraft did not change."""
    name = method_name_of(model)
    return dense_method() if name is None else get_method(name)


def expert_kinds() -> tuple[str, ...]:
    """UpIT expert kinds, one per method that declares one."""
    return tuple(m.expert_kind for m in _METHODS.values() if m.expert_kind)


def method_for_kind(kind: str) -> Method:
    """The method whose MoE an UpIT expert set of `kind` builds; ConfigError naming the kinds otherwise."""
    for method in _METHODS.values():
        if method.expert_kind == kind:
            return method
    raise ConfigError(f"expert kind must be one of {', '.join(expert_kinds())}; got {kind!r}")


def method_order(name: str) -> int:
    """Position of a method in the registry (unknown names last), for tables that list methods."""
    names = list(_METHODS)
    return names.index(name) if name in names else len(names)
