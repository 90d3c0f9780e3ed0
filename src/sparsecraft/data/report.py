"""`DataReport`: what was read, skipped (per reason, with the first few locations), mixed and tokenised."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .formats import REASONS

MAX_EXAMPLES = 5  # skipped-record locations kept per source for display


@dataclass
class SourceReport:
    """One data file: records read, kept and skipped, and how many went to each split."""

    name: str
    path: str
    format: str = "auto"
    split: str = "train"  # which split the file was named for: train or eval
    read: int = 0
    valid: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "file:line reason: detail"
    train: int = 0
    eval: int = 0
    notes: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where} {reason}" + (f": {detail}" if detail else ""))

    def skipped_summary(self) -> str:
        """e.g. "malformed_json 2, empty_turn 1" in the order of `REASONS`."""
        order = {r: i for i, r in enumerate(REASONS)}
        items = sorted(self.skipped.items(), key=lambda kv: order.get(kv[0], len(order)))
        return ", ".join(f"{r} {n}" for r, n in items)


@dataclass
class DataReport:
    """The data pipeline's account, for the terminal (`format()`) and for tests (the counters)."""

    sources: list[SourceReport] = field(default_factory=list)
    train_records: int = 0
    eval_records: int = 0
    dropped: dict[str, Counter] = field(default_factory=dict)  # split -> tokenisation drop reason -> count
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> samples/tokens/targets/rows
    notes: list[str] = field(default_factory=list)
    streamed: bool = False  # the train split is a stream: no record count until it is read

    @property
    def skipped(self) -> Counter:
        """Skipped records per reason, over every file."""
        total: Counter = Counter()
        for s in self.sources:
            total.update(s.skipped)
        return total

    @property
    def per_source(self) -> dict[str, dict[str, int]]:
        """Counts per source name (files sharing a name are added up)."""
        out: dict[str, dict[str, int]] = {}
        for s in self.sources:
            row = out.setdefault(s.name, {"read": 0, "valid": 0, "skipped": 0, "train": 0, "eval": 0})
            for key, value in (("read", s.read), ("valid", s.valid), ("skipped", sum(s.skipped.values())),
                               ("train", s.train), ("eval", s.eval)):
                row[key] += value
        return out

    def format(self) -> str:
        """A few lines for the terminal."""
        train = "streamed" if self.streamed else f"{self.train_records:,}"
        lines = [f"data: {len(self.sources)} source(s), {train} train / {self.eval_records:,} eval records"]
        for s in self.sources:
            split = "" if s.split == "train" else f" [{s.split}]"
            line = f"  {s.name}{split} ({s.format}, {s.path}): {s.read:,} read, {s.valid:,} valid"
            if not (self.streamed and s.split == "train"):  # a stream's draws are not counted per source
                line += f" -> {s.train:,} train, {s.eval:,} eval"
            if s.skipped:
                line += f"; skipped {sum(s.skipped.values()):,} ({s.skipped_summary()})"
            lines.append(line)
            lines += [f"      {e}" for e in s.examples]
            lines += [f"      note: {n}" for n in s.notes]
        for split, counts in self.dropped.items():
            if sum(counts.values()):
                detail = ", ".join(f"{r} {n:,}" for r, n in sorted(counts.items()))
                lines.append(f"  tokenised {split}: dropped {sum(counts.values()):,} ({detail})")
        for split, t in self.tokens.items():
            rows = f" in {t['rows']:,} packed rows" if t.get("rows") else ""
            lines.append(f"  {split}: {t['samples']:,} samples{rows}, {t['tokens']:,} tokens, "
                         f"{t['targets']:,} trained")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
