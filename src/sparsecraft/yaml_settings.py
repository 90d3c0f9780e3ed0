"""Settings from a YAML file plus `a.b=value` overrides, checked into a dataclass: one-line `ConfigError`s.

The steps, each usable alone:

    data = read_yaml(path, "recipe")                   # the document ({} when empty)
    for extra in parse_overrides(["a.b=1", "lr=3e-4"]):
        data = merge(data, extra, shorthands={"lr": ("optim", "lr")})
    settings = build_dataclass(MySettings, data)        # unknown fields and wrong types refused

This module knows no particular settings: shorthands (`lr=` for `optim.lr=`) and scalar expansions (`data=FILE`
for a whole `data:` mapping) are parameters of `merge`, given by whoever owns the settings.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["read_yaml", "parse_overrides", "merge", "build_dataclass", "coerce", "flatten"]


def read_yaml(path: str | Path, what: str = "YAML file", *, mapping: bool = False) -> Any:
    """The YAML document at `path` (`{}` for an empty file).

    A missing file is `ConfigError("{what} not found: {path}")`, invalid YAML `"{path} is not valid YAML: ..."`
    (the parser's first line); with `mapping`, a document that is not a mapping is refused too.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if mapping and not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> list[dict]:
    """`["a.b=1", "data=x.jsonl"]` -> one nested dict per item, applied in order; values parsed as YAML."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. max_steps=10)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        for part in reversed(key.strip().split(".")):
            value = {part: value}
        parsed.append(value)
    return parsed


def merge(base: dict, extra: dict, shorthands: Mapping[str, tuple[str, ...]] | None = None,
          expand: Mapping[str, Callable[[Any, Any], Any]] | None = None) -> dict:
    """`extra` merged into a copy of `base`, mappings recursively; any other value of `extra` replaces.

    Top-level keys only (never inside a mapping), and only when the value is not a mapping:
    `shorthands[key]` is the dotted path the value goes to (`{"lr": ("optim", "lr")}`: `lr=1` is `optim.lr=1`);
    `expand[key](value, current)` is the new value of `key` given its current one (e.g. `data=FILE`).
    """
    shorthands, expand = shorthands or {}, expand or {}
    out = dict(base)
    for key, value in extra.items():
        if key in shorthands and not isinstance(value, dict):
            first, *rest = shorthands[key]
            for part in reversed(rest):
                value = {part: value}
            section = out.get(first) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{first} is {section!r}, not a mapping: {key}={extra[key]!r} cannot go into it")
            out[first] = merge(section, value)
        elif key in expand and not isinstance(value, dict):
            out[key] = expand[key](value, out.get(key))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(path: str, value: Any, tp) -> Any:
    """Check `value` against the annotated type `tp` (`path` names it in errors), allowing int where float is
    expected (and a float written as a string: YAML 1.1 reads 3e-3, no dot, as one)."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}.get(tp, Any)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(path, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} has the wrong type")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{path} must be int, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls, data: dict, prefix: str = "", what: str = "config"):
    """`cls(**data)` with every field checked (`coerce`), nested dataclass fields built from their mappings.

    `prefix` (e.g. `"optim."`) is put before field names in errors; `what` names the settings there:
    `unknown {what} field optim.x (known: ...)`, `{what} must be a mapping`.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or what} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {what} field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, f"{prefix}{name}.", what)
        else:
            kwargs[name] = coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def flatten(settings: dict, prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`: nested settings as dotted keys with JSON values (sorted keys), so two
    sets of settings compare field by field."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return out
