"""Where a source's records are, and reading them: a local file; a local folder (a `save_to_disk` folder, or data
files whose splits and subsets datasets' folder builder works out, README `configs:` included); or a hub dataset,
resolved to its snapshot folder in huggingface_hub's cache and then read like a local folder.

Reading a local file or folder never touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import DataError, DataSource
from .files import Located, iter_records
from .hub import snapshot_folder
from .known import DATA_SUFFIXES, known_set, looks_like_hub_id


@dataclass
class Location:
    """One source's records: data files in reading order, each with the name locations in the report get, or a
    dataset saved with `save_to_disk` (already opened, memory-mapped)."""

    label: str  # the path or hub ID, for messages
    files: list[tuple[str, Path]] = field(default_factory=list)
    saved: Any = None  # a datasets.Dataset

    def records(self) -> Iterator[Located]:
        """A fresh pass over every record, each with its location (`file:line`, `file:row N`)."""
        if self.saved is not None:
            for row, record in enumerate(self.saved.to_iterable_dataset(), 1):
                yield f"{self.label}:row {row}", record
        for label, path in self.files:
            for where, record in iter_records(path):
                yield f"{label}:{where}", record


def locate(source: DataSource) -> Location:
    """The files (or saved dataset) holding `source`'s split; one-line `DataError` for what is not there."""
    path = Path(source.path)
    if path.exists() and source.revision is not None:
        raise DataError(f"{source.path}: revision applies to hub datasets, and this is a local path")
    if path.is_file():
        for key in ("subset", "files"):
            if getattr(source, key) is not None:
                raise DataError(f"{source.path}: {key} applies to folders and hub datasets, and this is a file")
        if source.split not in (None, "train"):
            raise DataError(f"{source.path}: a single file holds one split; split: applies to folders and hub "
                            "datasets")
        return Location(source.path, [(source.path, path)])
    if path.is_dir():
        return _in_folder(source, path, "train")
    if not looks_like_hub_id(source.path):
        raise DataError(f"data source not found: {path}")
    known = known_set(source.path)
    folder = snapshot_folder(source.path, source.revision, source.files)
    return _in_folder(source, folder, known.split if known else "train")


def _name(label: str, folder: Path, path: Path) -> str:
    try:
        return f"{label}/{path.relative_to(folder).as_posix()}"
    except ValueError:  # a path the builder resolved elsewhere (a symlink's target)
        return f"{label}/{path.name}"


def _in_folder(source: DataSource, folder: Path, default_split: str) -> Location:
    label = source.path
    split = source.split or default_split
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return Location(label, saved=_saved(source, folder, split))
    if source.files is not None:
        found = sorted({p for pattern in source.files for p in folder.glob(pattern)
                        if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES)})
        if not found:
            raise DataError(f"{label}: no data file matches files: {', '.join(source.files)}")
        return Location(label, [(_name(label, folder, p), p) for p in found])
    splits = _split_files(folder, source.subset, label)
    if split not in splits:
        raise DataError(f"{label}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
    return Location(label, [(_name(label, folder, Path(f)), Path(f)) for f in splits[split]])


def _split_files(folder: Path, subset: str | None, label: str) -> dict[str, list[str]]:
    """Split name -> data files of a folder, as datasets' folder builder assigns them (README `configs:` and
    file-name patterns such as `train-*.parquet`, `data/test.jsonl`)."""
    from datasets import get_dataset_config_names, load_dataset_builder

    try:
        builder = load_dataset_builder(str(folder), name=subset)
    except FileNotFoundError:  # datasets' EmptyDatasetError
        raise DataError(f"{label}: no data files (JSON, JSON Lines, Parquet, CSV, Arrow) in it") from None
    except ValueError as e:  # no such subset, or several and none named
        try:
            names = ", ".join(get_dataset_config_names(str(folder)))
        except (OSError, ValueError):
            names = ""
        if not names:
            raise DataError(f"{label}: cannot read it: {str(e).strip().splitlines()[0]}") from None
        if subset is None:
            raise DataError(f"{label}: has several subsets; pick one with subset: ({names})") from None
        raise DataError(f"{label}: no subset {subset!r} (subsets: {names})") from None
    return {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}


def _saved(source: DataSource, folder: Path, split: str):
    """The split of a `save_to_disk` folder (a DatasetDict's split; a single Dataset is its own)."""
    from datasets import DatasetDict, load_from_disk

    if source.subset is not None or source.files is not None:
        raise DataError(f"{source.path}: a save_to_disk folder has no subsets or files to choose")
    try:
        saved = load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise DataError(f"{source.path}: cannot read the saved dataset: {str(e).strip().splitlines()[0]}") from None
    if isinstance(saved, DatasetDict):
        if split not in saved:
            raise DataError(f"{source.path}: no split {split!r} (splits: {', '.join(saved)})")
        return saved[split]
    if source.split is not None:
        raise DataError(f"{source.path}: a saved Dataset (not a DatasetDict) has no splits to choose")
    return saved
