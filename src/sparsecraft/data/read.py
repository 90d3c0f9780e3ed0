"""`OpenedSource`: one source located, its format decided from its first records, and read pass by pass into
conversations, each bad record skipped and counted with its location."""

from __future__ import annotations

from itertools import chain, islice
from pathlib import Path
from typing import Iterator

from .columns import rename, unknown_columns
from .config import FORMATS, DataError, DataSource
from .formats import BadRecord, detect_file_format, normalise
from .known import known_set
from .locate import locate
from .report import SourceReport

DETECT_FROM = 16  # records looked at to detect a source's layout


class OpenedSource:
    """A source ready to read: `conversations()` is one pass over its usable records, in order.

    Opening reads only the first records (to detect the format and check `columns:`), so a bad source fails
    before anything heavy happens, and a streamed one is not read further.
    """

    def __init__(self, source: DataSource, split: str = "train"):
        """`split`: the role the report gives the source (train or eval), not the dataset split it reads."""
        self.source = source
        self.location = locate(source)
        known = None if Path(source.path).exists() else known_set(source.path)  # hub IDs only
        self.columns = source.columns or (known.columns if known else None) or None
        # columns given with format auto were checked as record fields: they rename record fields only
        self.mapped_as = source.format if source.columns else (known.format if known else "auto")
        fmt = source.format if source.format != "auto" or known is None else known.format
        self.report = SourceReport(name=source.display_name, path=source.path, format=fmt, split=split)
        items = self.location.records()
        self._head = list(islice(items, DETECT_FROM * 4))  # room for bad lines before the first records
        self._rest: Iterator | None = items
        records = [r for _, r in self._head if not isinstance(r, BadRecord)]
        if fmt == "auto":
            fmt = detect_file_format([rename(r, self.columns, self.mapped_as) for r in records][:DETECT_FROM])
            if fmt is None:
                keys = next((sorted(r) for r in records if isinstance(r, dict)), None)
                seen = (f"first record keys: {', '.join(keys)}" if keys is not None
                        else "no JSON object in the first records")
                raise DataError(f"{source.path}: cannot tell the record format ({seen}); set format: to one of "
                                f"{', '.join(FORMATS[1:])}, or map columns: onto one")
            self.report.format = fmt
        missing, seen = unknown_columns(records, self.columns, self.mapped_as)
        if missing:
            raise DataError(f"{source.path}: unknown column {missing[0]!r} in columns: (its records have: "
                            f"{', '.join(seen)})")

    @property
    def format(self) -> str:
        return self.report.format

    def conversations(self, count: bool = True) -> Iterator[dict]:
        """One pass: `{"messages": [...], "source": name}` for each usable record, at most `take` of them.

        `count`: add what is read and skipped to the report (the first pass of a stream; later passes re-read it).
        """
        if self._rest is not None:  # the first pass goes on from the records already read to detect the format
            items, self._rest = chain(self._head, self._rest), None
            self._head = []
        else:
            items = self.location.records()
        report, take, usable = self.report, self.source.take, 0
        for where, record in items:
            if count:
                report.read += 1
            if isinstance(record, BadRecord):
                if count:
                    report.skip(record.reason, where, record.detail)
                continue
            try:
                messages = normalise(rename(record, self.columns, self.mapped_as), self.format)
            except BadRecord as bad:
                if count:
                    report.skip(bad.reason, where, bad.detail)
                continue
            usable += 1
            if count:
                report.valid += 1
            yield {"messages": messages, "source": report.name}
            if take is not None and usable >= take:
                return

    def no_usable_record(self) -> DataError:
        """The error for a source none of whose records (read so far) could be used."""
        report = self.report
        why = "the file holds no record"
        if report.examples:
            why = f"skipped {sum(report.skipped.values())}: {report.skipped_summary()}; first: {report.examples[0]}"
        return DataError(f"{self.source.path}: no usable {report.format} record out of {report.read} ({why})")
