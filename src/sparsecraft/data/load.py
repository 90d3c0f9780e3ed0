"""`load_records`: sources → validated conversations → the mixed train split and the held-out split;
`open_stream`: the same with the train split as a stream (stream.py); `load_data`: whichever the config asks for.

Needs no tokenizer and no model, so bad data fails before anything heavy is loaded.
"""

from __future__ import annotations

from datasets import Dataset, concatenate_datasets

from .config import DataConfig, DataError, DataSource
from .mixing import draw, plan_counts, rng_for, split_eval
from .read import OpenedSource
from .report import DataReport, SourceReport
from .stream import RecordStream, open_sources

_TRAIN_DRAW, _EVAL_SPLIT, _EVAL_DRAW = 0, 1, 2  # RNG purposes


def load_source(source: DataSource, split: str = "train") -> tuple[list[dict], SourceReport]:
    """The usable conversations of one source (`{"messages": [...], "source": name}`) and its report.

    `split`: the role the report gives it (train or eval). Raises `DataError` when the source is not there, its
    layout cannot be detected or no record is usable.
    """
    opened = OpenedSource(source, split)
    records = list(opened.conversations())
    opened.report.valid = len(records)
    if not records:
        raise opened.no_usable_record()
    return records, opened.report


def _mix(pools: list[list[dict]], sources: list[DataSource], reports: list[SourceReport], total: int | None,
         seed: int, purpose: int, split: str, notes: list[str]) -> Dataset:
    """Draw each source's planned count, concatenate, shuffle."""
    counts, caps = plan_counts(sources, [len(p) for p in pools], total)
    notes += caps
    parts = []
    for i, (pool, count, report) in enumerate(zip(pools, counts, reports)):
        setattr(report, split, count)
        indices = draw(len(pool), count, rng_for(seed, i, purpose))
        parts.append(Dataset.from_list(pool).select(indices) if count else None)
    parts = [p for p in parts if p is not None]
    if not parts:
        raise DataError(f"data: the {split} split is empty")
    return concatenate_datasets(parts).shuffle(seed=seed).flatten_indices()


def load_records(config: DataConfig) -> tuple[Dataset, Dataset | None, DataReport]:
    """(train records, held-out records or None, report). Records have columns `messages` (list of
    `{role, content}`) and `source`. Deterministic for `config.seed`."""
    if config.streams:
        raise DataError("data: streamed sources have no fixed list of records; this step needs one (turn streaming "
                        "off here)")
    report = DataReport()
    loaded = [load_source(s) for s in config.sources]
    pools = [records for records, _ in loaded]
    reports = [r for _, r in loaded]
    report.sources += reports
    eval_ds = _held_out(config, report)
    if config.eval_fraction > 0:
        eval_parts = []
        for i, (records, src_report) in enumerate(zip(pools, reports)):
            train_idx, eval_idx = split_eval(len(records), config.eval_fraction, rng_for(config.seed, i, _EVAL_SPLIT))
            eval_parts += [records[j] for j in eval_idx]
            src_report.eval = len(eval_idx)
            if len(eval_idx) == 0:
                src_report.notes.append("too few records to hold any out for eval")
            pools[i] = [records[j] for j in train_idx]
        eval_ds = Dataset.from_list(eval_parts).shuffle(seed=config.seed).flatten_indices() if eval_parts else None
    train_ds = _mix(pools, config.sources, reports, config.total, config.seed, _TRAIN_DRAW, "train", report.notes)
    report.train_records = len(train_ds)
    report.eval_records = len(eval_ds) if eval_ds is not None else 0
    return train_ds, eval_ds, report


def _held_out(config: DataConfig, report: DataReport) -> Dataset | None:
    """The held-out split of `eval_sources` (read whole), or None."""
    if not config.eval_sources:
        return None
    loaded = [load_source(s, split="eval") for s in config.eval_sources]
    report.sources += [r for _, r in loaded]
    return _mix([r for r, _ in loaded], config.eval_sources, [r for _, r in loaded], None, config.seed, _EVAL_DRAW,
                "eval", report.notes)


def open_stream(config: DataConfig) -> tuple[RecordStream, Dataset | None, DataReport]:
    """(the train split as an endless mixed stream, held-out records or None, report) of a streaming config.

    Opens every train source (a streamed one reads only its first records, to detect the format; one that does
    not stream is read whole) and reads the held-out sources whole, so bad data still fails here.
    """
    report = DataReport(streamed=True)
    opened = [OpenedSource(s) for s in config.sources]
    for o in opened:
        o.report.notes.append("streamed: counts are of what was read so far" if config.streamed(o.source)
                              else "read whole, drawn from in shuffled passes")
    stream = open_sources(config, opened)
    report.sources += [o.report for o in opened]
    eval_ds = _held_out(config, report)
    report.eval_records = len(eval_ds) if eval_ds is not None else 0
    return stream, eval_ds, report


def load_data(config: DataConfig) -> tuple[Dataset | RecordStream, Dataset | None, DataReport]:
    """`open_stream(config)` if the config streams, else `load_records(config)`."""
    return open_stream(config) if config.streams else load_records(config)
