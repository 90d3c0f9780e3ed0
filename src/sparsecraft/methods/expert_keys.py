"""Canonical expert keys `layers.{i}.{rest}`: `i` is the decoder layer index (`surgery.find_decoder_layers`),
`rest` a name inside that layer's MLP (`gate_proj.weight`, `down`, `gate_proj.lora_A`)."""

from __future__ import annotations

import re
from collections.abc import Iterable

KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def layer_of(key: str) -> int:
    return int(KEY.match(key).group(1))


def by_layer(keys: Iterable[str]) -> dict[int, dict[str, str]]:
    """`{layer: {rest: full key}}` for canonical keys `layers.{i}.{rest}`."""
    out: dict[int, dict[str, str]] = {}
    for key in keys:
        m = KEY.match(key)
        out.setdefault(int(m.group(1)), {})[m.group(2)] = key
    return out
