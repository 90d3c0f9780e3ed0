"""Reading records from local files: JSON Lines, JSON (an array, or an object holding one), Parquet, CSV, Arrow.

JSON is read by hand, line by line for JSON Lines, so that one bad line or invalid UTF-8 costs one record
(yielded as a `BadRecord` with its line number) and never the whole file. Parquet, CSV and Arrow (the files
`save_to_disk` and the hub write) are read by datasets' builders, streamed: row batches, never the whole file, and
no copy in datasets' cache.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator

from .config import DataError
from .formats import BadRecord, detect_format

Located = tuple[str, Any]  # (where in the file: "12" = line 12, "row 12" for tables; record or BadRecord)

_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()
_LIST_KEYS = ("data", "train", "records", "examples", "rows", "instances")
TABLES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # extension -> datasets' packaged builder


def iter_records(path: str | Path) -> Iterator[Located]:
    """Every record of a file, in order, with its location; unreadable ones as `BadRecord`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data source not found: {path}")
    name = path.name.lower()
    try:
        if path.suffix.lower() in TABLES:
            yield from _iter_table(path, TABLES[path.suffix.lower()])
        elif name.removesuffix(".gz").endswith((".jsonl", ".ndjson")):
            with _open(path) as f:
                yield from _iter_lines(f)
        elif name.removesuffix(".gz").endswith(".json"):
            yield from _iter_json(path)
        else:
            raise DataError(f"{path}: unknown file type (expected .json, .jsonl or .ndjson, optionally .gz, "
                            ".parquet, .csv or .arrow)")
    except (OSError, EOFError) as e:  # unreadable file, broken gzip stream
        raise DataError(f"{path}: cannot read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _iter_lines(lines) -> Iterator[Located]:
    """JSON Lines from an iterable of bytes lines."""
    for number, raw in enumerate(lines, 1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield str(number), BadRecord("invalid_utf8", f"byte {e.start} of the line")
            continue
        try:
            yield str(number), json.loads(text)
        except json.JSONDecodeError as e:
            yield str(number), BadRecord("malformed_json", f"{e.msg} at column {e.colno}")


class _Lines:
    """Line numbers of character positions, counted incrementally (positions only grow)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> str:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return str(self.line)


def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _iter_json(path: Path) -> Iterator[Located]:
    with _open(path) as f:
        data = f.read().removeprefix(b"\xef\xbb\xbf")
    # Undecodable bytes become lone surrogates; the record holding them is rejected as invalid_utf8 later.
    text = data.decode("utf-8", errors="surrogateescape")
    i = _skip(text, 0)
    if i == len(text):
        return
    lines = _Lines(text)
    if text[i] == "[":
        yield from _iter_array(text, i, lines)
        return
    try:
        value, end = _DECODER.raw_decode(text, i)
    except json.JSONDecodeError as e:
        if _looks_like_json_lines(data):  # JSON Lines saved as .json, with a bad line
            yield from _iter_lines(data.splitlines())
            return
        yield lines(e.pos), BadRecord("malformed_json", f"{e.msg} (the rest of the file is unreadable)")
        return
    if _skip(text, end) < len(text):  # more values follow: JSON Lines saved as .json
        yield from _iter_lines(data.splitlines())
        return
    key = _record_list_key(value, path)
    if key is None:
        yield lines(i), value  # a single record
        return
    yield from _iter_array(text, _member_start(text, i, key), lines)


def _looks_like_json_lines(data: bytes) -> bool:
    """Whether one of the first lines is a whole JSON object on its own (pretty-printed JSON's lines are not)."""
    lines = [line for line in data.splitlines()[:8] if line.strip()][:4]
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                return True
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return False


def _record_list_key(value: Any, path: Path) -> str | None:
    """The key of the list of records in a top-level object; None if the object is itself a record."""
    if not isinstance(value, dict):
        return None
    lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)
             and detect_format(v[0]) is not None]
    if not lists:
        return None
    if len(lists) > 1:
        preferred = [k for k in _LIST_KEYS if k in lists]
        if not preferred:
            raise DataError(f"{path}: the JSON object holds several lists of records ({', '.join(lists)}); "
                            "keep one per file")
        return preferred[0]
    return lists[0]


def _member_start(text: str, i: int, key: str) -> int:
    """Position of the value of `key` in the object starting at `text[i]` (the text is known to parse)."""
    i = _skip(text, i + 1)
    while True:
        name, i = _DECODER.raw_decode(text, i)
        i = _skip(text, _skip(text, i) + 1)  # past ':'
        if name == key:
            return i
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, _skip(text, i) + 1)  # past ','


def _iter_array(text: str, i: int, lines: _Lines) -> Iterator[Located]:
    """Elements of the JSON array starting at `text[i]`; stops at the first malformed element (no resync)."""
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return
    while True:
        try:
            value, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield lines(i), BadRecord("malformed_json", f"{e.msg} (the rest of the array is unreadable)")
            return
        yield lines(i), value
        i = _skip(text, end)
        if text.startswith(",", i):
            i = _skip(text, i + 1)
        elif text.startswith("]", i):
            return
        else:
            yield lines(i), BadRecord("malformed_json", "expected ',' or ']' (the rest of the array is unreadable)")
            return


def _iter_table(path: Path, builder: str) -> Iterator[Located]:
    """Rows of a Parquet, CSV or Arrow file through datasets' builder, streamed (a local file: no network)."""
    from datasets import load_dataset

    kind = {"parquet": "Parquet", "csv": "CSV", "arrow": "Arrow"}[builder]
    try:
        options = _csv_options(path) if builder == "csv" else {}
        rows = load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **options)
        for row, record in enumerate(rows, 1):
            yield f"row {row}", record
    except Exception as e:  # pyarrow and the builders raise many kinds of error for a damaged file
        if isinstance(e, DataError):
            raise
        text = str(e).strip().splitlines()
        raise DataError(f"{path}: cannot read {kind}: {text[0] if text else type(e).__name__}") from None


def _csv_options(path: Path) -> dict:
    """Every CSV column read as text, empty cells as "" (instruction data: `2` is an answer, not a number, and
    `NA` a word)."""
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    # a blank header cell (pandas' index column from DataFrame.to_csv) gets the name pandas gives it on reading
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    return {"features": Features({name: Value("string") for name in names}), "keep_default_na": False}
