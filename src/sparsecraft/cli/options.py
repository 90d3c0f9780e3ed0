"""Crafting options on the command line, made from `CraftConfig`'s fields (`config.craft_fields`).

Every field but `extra` becomes one option: its flag, type, default and help come from the field's metadata; bools
are `--flag/--no-flag` pairs; a field with choices shows them (`{a,b}`) but the value is checked by
`CraftConfig.validate`, so a bad one is the same one-line `error:` (exit 2) as in a recipe.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from ..config import CraftConfig, CraftField, craft_fields


def option_dest(f: CraftField) -> str:
    """The `args` attribute of a field's option: its flag without dashes (`--experts` -> `experts`)."""
    return f.flag.lstrip("-").replace("-", "_")


def _selected(only: Iterable[str] | None) -> list[CraftField]:
    fields = list(craft_fields())
    if only is None:
        return fields
    wanted = list(only)
    unknown = sorted(set(wanted) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"not a CraftConfig option: {', '.join(unknown)}")
    return [f for f in fields if f.name in wanted]


def add_craft_options(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add an option per `CraftConfig` field (or only the fields named in `only`) to `parser` (or an argument
    group of one)."""
    for f in _selected(only):
        kwargs: dict = {"dest": option_dest(f), "default": f.default, "help": f.help}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.type
        if f.choices:
            kwargs["metavar"] = "{" + ",".join(f.choices) + "}"
        parser.add_argument(f.flag, **kwargs)


def craft_config_from_options(args: argparse.Namespace, only: Iterable[str] | None = None) -> CraftConfig:
    """The `CraftConfig` of parsed options added by `add_craft_options` (the same `only`); fields left out keep
    their defaults. Raises `ConfigError` (one line) for a bad value."""
    return CraftConfig(**{f.name: getattr(args, option_dest(f)) for f in _selected(only)})
