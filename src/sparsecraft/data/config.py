"""`DataSource` / `DataConfig`: what to read, how to mix it, how to tokenise it; validated with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .columns import check_columns
from .known import known_set, looks_like_hub_id

FORMATS = ("auto", "sharegpt", "messages", "alpaca", "metamath", "magicoder", "camelidae")
NAMED_TEMPLATES = ("auto", "tokenizer", "camelidae", "chatml")
TRUNCATION_SIDES = ("right", "left")


class DataError(ConfigError):
    """Data cannot be used as asked (no usable record, unreadable file); the message is one line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass: `samples: true` is a mistake


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _optional_text(value: Any, where: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")


@dataclass
class DataSource:
    """One set of records: a local file (JSON, JSON Lines, Parquet, CSV, Arrow), a local folder (data files or a
    `save_to_disk` folder) or a hub dataset ID (known.py tells which).

    - `format`: record layout, or `auto` to detect it from the first records (a known hub ID brings its own).
    - `weight`: share of `DataConfig.total` among the weighted sources (normalised over them); streamed, the
      probability of drawing from this source (default 1).
    - `samples`: exact number of records to take; more than the file has is capped (with a note in the report)
      unless `replace` is set, which repeats the file and draws the remainder.
    - neither: every record once.
    - `name`: the `source` value of its records (default: the file name without extensions, or the known name).
    - `split`, `subset`, `revision`: which split (default `train`), configuration and hub revision of a folder or
      hub dataset; `files`: glob patterns inside the folder or repo instead (only those files are fetched).
    - `columns`: `{format field: column of this source}`, to read any schema as one of the known formats.
    - `take`: only the first N usable records (before mixing); `streaming`: read lazily (None: as the config says).
    """

    path: str
    format: str = "auto"
    weight: float | None = None
    samples: int | None = None
    name: str | None = None
    replace: bool = False
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    files: list[str] | None = None
    columns: dict[str, str] | None = None
    take: int | None = None
    streaming: bool | None = None

    def __post_init__(self) -> None:
        self.validate("data source")

    def validate(self, where: str) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ConfigError(f"{where}.path: expected a file, folder or hub dataset ID, got {self.path!r}")
        self.path = str(self.path)
        if self.format not in FORMATS:
            raise ConfigError(f"{where}.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.weight is not None and (not _is_number(self.weight) or not self.weight > 0):
            raise ConfigError(f"{where}.weight: expected a positive number, got {self.weight!r}")
        if self.samples is not None and (not _is_int(self.samples) or self.samples <= 0):
            raise ConfigError(f"{where}.samples: expected a positive integer, got {self.samples!r}")
        if self.weight is not None and self.samples is not None:
            raise ConfigError(f"{where}: give weight or samples, not both")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ConfigError(f"{where}.name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.replace, bool):
            raise ConfigError(f"{where}.replace: expected true or false, got {self.replace!r}")
        for key in ("split", "subset", "revision"):
            _optional_text(getattr(self, key), f"{where}.{key}")
        if isinstance(self.files, str):
            self.files = [self.files]
        if self.files is not None and (not isinstance(self.files, list) or not self.files
                                       or not all(isinstance(f, str) and f for f in self.files)):
            raise ConfigError(f"{where}.files: expected a glob pattern or a list of them, got {self.files!r}")
        if self.files is not None and (self.split is not None or self.subset is not None):
            raise ConfigError(f"{where}: give files or split/subset, not both")
        if self.columns is not None:
            check_columns(self.columns, self.format, where)
        if self.take is not None and (not _is_int(self.take) or self.take <= 0):
            raise ConfigError(f"{where}.take: expected a positive integer, got {self.take!r}")
        if self.streaming is not None and not isinstance(self.streaming, bool):
            raise ConfigError(f"{where}.streaming: expected true or false, got {self.streaming!r}")

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        known = known_set(self.path)
        if known is not None:
            return known.name
        stem = Path(self.path).name
        for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".arrow"):
            stem = stem[: -len(ext)] if stem.endswith(ext) else stem
        return stem

    @classmethod
    def from_dict(cls, d: Any, where: str = "data source", base_dir: str | Path | None = None) -> "DataSource":
        """A source from a mapping, or a bare path string; relative paths are taken from `base_dir`."""
        if isinstance(d, (str, Path)):
            d = {"path": str(d)}
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a path or a mapping with 'path', got {type(d).__name__}")
        _check_fields(cls, d, where)
        if "path" not in d:
            raise ConfigError(f"{where}: missing 'path'")
        d = dict(d)
        if base_dir is not None and isinstance(d["path"], str) and not Path(d["path"]).is_absolute():
            joined = Path(base_dir) / d["path"]
            if joined.exists() or not looks_like_hub_id(d["path"]):  # a hub dataset ID stays as it is
                d["path"] = str(joined)
        src = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(src, f.name, d.get(f.name, f.default))
        src.validate(where)
        return src


@dataclass
class DataConfig:
    """The whole data recipe.

    - `eval_sources` or `eval_fraction` (per source, so every domain is in the held-out split), not both.
    - `template`: `auto` (the tokenizer's chat template if it has one, else camelidae), `tokenizer`, `camelidae`,
      `chatml`, or a Jinja chat template given literally.
    - `total`: target record count of the weighted sources; None = as many as the data allows without repeats.
    - `truncation`: which end of a sample longer than `max_length` is cut.
    - `streaming`: read every source lazily and tokenise on the fly (a source may also say so alone); the train
      split is then an endless stream mixed by weight (needs `train.max_steps`; no `samples`, `total`,
      `eval_fraction` or `packing`). `shuffle_buffer`: records each streamed source is shuffled within.
    """

    sources: list[DataSource]
    eval_sources: list[DataSource] = field(default_factory=list)
    eval_fraction: float = 0.0
    template: str = "auto"
    max_length: int = 512
    packing: bool = False
    seed: int = 0
    total: int | None = None
    truncation: str = "right"
    streaming: bool = False
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("sources", "eval_sources"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(s, DataSource) for s in value):
                raise ConfigError(f"data.{key}: expected a list of data sources")
        if not self.sources:
            raise ConfigError("data.sources: at least one source is needed")
        if not _is_number(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: expected a number in [0, 1), got {self.eval_fraction!r}")
        if self.eval_sources and self.eval_fraction:
            raise ConfigError("data: give eval_sources or eval_fraction, not both")
        if not isinstance(self.template, str) or not (self.template in NAMED_TEMPLATES or "{" in self.template):
            raise ConfigError(f"data.template: expected one of {', '.join(NAMED_TEMPLATES)} or a Jinja chat "
                              f"template, got {self.template!r}")
        if not _is_int(self.max_length) or self.max_length < 2:
            raise ConfigError(f"data.max_length: expected an integer >= 2, got {self.max_length!r}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"data.packing: expected true or false, got {self.packing!r}")
        if not _is_int(self.seed):
            raise ConfigError(f"data.seed: expected an integer, got {self.seed!r}")
        if self.total is not None and (not _is_int(self.total) or self.total <= 0):
            raise ConfigError(f"data.total: expected a positive integer, got {self.total!r}")
        if self.truncation not in TRUNCATION_SIDES:
            raise ConfigError(f"data.truncation: expected one of {', '.join(TRUNCATION_SIDES)}, "
                              f"got {self.truncation!r}")
        if not isinstance(self.streaming, bool):
            raise ConfigError(f"data.streaming: expected true or false, got {self.streaming!r}")
        if not _is_int(self.shuffle_buffer) or self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer: expected an integer >= 0, got {self.shuffle_buffer!r}")
        if self.streams:
            self._check_streaming()

    @property
    def streams(self) -> bool:
        """Whether the train split is a stream (the config or one of its train sources streams)."""
        return self.streaming or any(s.streaming for s in self.sources)

    def streamed(self, source: DataSource) -> bool:
        """Whether this train source is read lazily (else it is read whole and drawn from in shuffled passes)."""
        return source.streaming if source.streaming is not None else self.streaming

    def _check_streaming(self) -> None:
        # what needs the whole set in memory, or its length, is refused in one line rather than done quietly
        if self.packing:
            raise ConfigError("data.packing: not available with streaming (packing plans rows over samples that "
                              "a stream has not read yet); turn one of them off")
        if self.total is not None:
            raise ConfigError("data.total: a stream has no total; with streaming the run's length is "
                              "train.max_steps")
        if self.eval_fraction:
            raise ConfigError("data.eval_fraction: a stream has no length to take a fraction of; give "
                              "eval_sources (read whole) instead")
        for i, s in enumerate(self.sources):
            if s.samples is not None:
                raise ConfigError(f"data.sources[{i}].samples: counts need the whole set; with streaming give "
                                  "weight (the share of draws) instead")

    @classmethod
    def from_dict(cls, d: Any, base_dir: str | Path | None = None) -> "DataConfig":
        """A config from a mapping (e.g. the `data:` section of a YAML recipe)."""
        if not isinstance(d, dict):
            raise ConfigError(f"data: expected a mapping, got {type(d).__name__}")
        _check_fields(cls, d, "data")
        if "sources" not in d:
            raise ConfigError("data: missing 'sources'")
        d = dict(d)
        for key in ("sources", "eval_sources"):
            value = d.get(key, [])
            if isinstance(value, (str, dict)):
                value = [value]  # one source given without a list
            if not isinstance(value, list):
                raise ConfigError(f"data.{key}: expected a list of sources, got {type(value).__name__}")
            d[key] = [DataSource.from_dict(s, f"data.{key}[{i}]", base_dir) for i, s in enumerate(value)]
        if _is_int(d.get("eval_fraction")):
            d["eval_fraction"] = float(d["eval_fraction"])
        return cls(**d)


def _check_fields(cls: type, d: dict, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
