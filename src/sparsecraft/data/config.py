"""`DataSource` / `DataConfig`: what to read, how to mix it, how to tokenise it; validated with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FORMATS = ("auto", "sharegpt", "messages", "alpaca", "metamath", "magicoder", "camelidae")
NAMED_TEMPLATES = ("auto", "tokenizer", "camelidae", "chatml")
TRUNCATION_SIDES = ("right", "left")


class DataError(ConfigError):
    """Data cannot be used as asked (no usable record, unreadable file); the message is one line."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int subclass: `samples: true` is a mistake


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class DataSource:
    """One data file.

    - `format`: record layout, or `auto` to detect it from the file's first records.
    - `weight`: share of `DataConfig.total` among the weighted sources (normalised over them).
    - `samples`: exact number of records to take; more than the file has is capped (with a note in the report)
      unless `replace` is set, which repeats the file and draws the remainder.
    - neither: every record once.
    - `name`: the `source` value of its records (default: the file name without extensions).
    """

    path: str
    format: str = "auto"
    weight: float | None = None
    samples: int | None = None
    name: str | None = None
    replace: bool = False

    def __post_init__(self) -> None:
        self.validate("data source")

    def validate(self, where: str) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise ConfigError(f"{where}.path: expected a file path, got {self.path!r}")
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

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.path).name
        for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet"):
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
            d["path"] = str(Path(base_dir) / d["path"])
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
