"""Column mapping: a source's own column names onto one known format's field names, so any schema can be read.

`columns: {instruction: question, output: answer}` reads the source's `question` as alpaca's `instruction` and its
`answer` as `output`. A key that is a turn field of the format (`from`/`value`, `role`/`content`, `input`/`output`
of camelidae) renames the keys inside each turn of the format's list of turns instead.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .formats import FIELDS, TURNS

_ALL_TOP = sorted({f for fields in FIELDS.values() for f in fields})


def check_columns(columns: Any, fmt: str, where: str) -> None:
    """One-line `ConfigError` unless `columns` maps fields of `fmt` (any format's record fields for `auto`) to
    column names."""
    if not isinstance(columns, dict) or not columns:
        raise ConfigError(f"{where}.columns: expected a mapping of format field -> column name, got {columns!r}")
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.columns.{key}: expected a column name, got {value!r}")
        if fmt == "auto":
            if key not in _ALL_TOP:
                turn = next((f for f, (_, t) in TURNS.items() if key in t), None)
                hint = f"; set format: {turn} to rename turn fields" if turn else ""
                raise ConfigError(f"{where}.columns: {key!r} is not a record field of any format "
                                  f"(fields: {', '.join(_ALL_TOP)}){hint}")
        elif key not in FIELDS[fmt] + TURNS.get(fmt, ("", ()))[1]:
            known = FIELDS[fmt] + TURNS.get(fmt, ("", ()))[1]
            raise ConfigError(f"{where}.columns: {key!r} is not a field of {fmt} (fields: {', '.join(known)})")


def _split(columns: dict[str, str], fmt: str) -> tuple[dict[str, str], dict[str, str]]:
    """(record-level mapping, turn-level mapping)."""
    turn_fields = TURNS.get(fmt, ("", ()))[1]
    top = {k: v for k, v in columns.items() if k not in turn_fields}
    return top, {k: v for k, v in columns.items() if k in turn_fields}


def _moved(item: dict, mapping: dict[str, str]) -> dict:
    """`item` with each mapped column moved to its field name (the source column goes, so detection is not misled
    by it); a column the item lacks is left out and the format's reader reports the missing field."""
    out = {k: v for k, v in item.items() if k not in mapping.values()}
    out.update({field: item[column] for field, column in mapping.items() if column in item})
    return out


def rename(record: Any, columns: dict[str, str] | None, fmt: str) -> Any:
    """The record with its columns renamed to `fmt`'s field names (records that are not objects pass unchanged,
    for the reader to reject)."""
    if not columns or not isinstance(record, dict):
        return record
    top, turn = _split(columns, fmt)
    out = _moved(record, top)
    if turn:
        key = TURNS[fmt][0]
        if isinstance(out.get(key), list):
            out[key] = [_moved(t, turn) if isinstance(t, dict) else t for t in out[key]]
    return out


def unknown_columns(records: list[Any], columns: dict[str, str] | None, fmt: str) -> tuple[list[str], list[str]]:
    """(mapped columns no record among `records` has, the columns they do have): a misspelt column name is an
    error at once rather than every record skipped as `missing_field`."""
    dicts = [r for r in records if isinstance(r, dict)]
    if not columns or not dicts:
        return [], []
    top, turn = _split(columns, fmt)
    seen = {k for r in dicts for k in r}
    missing = [c for c in top.values() if c not in seen]
    if turn:
        turns = [t for r in dicts for t in (_moved(r, top).get(TURNS[fmt][0]) or []) if isinstance(t, dict)]
        turn_seen = {k for t in turns for k in t}
        missing += [c for c in turn.values() if turns and c not in turn_seen]
        seen |= turn_seen
    return missing, sorted(seen)
