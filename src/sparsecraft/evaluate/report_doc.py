"""The comparison report as a document: `Section`s holding paragraphs, `Table`s and `Image`s.

Built by `compare.build_report`, rendered by `report_markdown` and `report_html`; this module holds only the
shapes they share. Paragraph text may use two bits of Markdown: `code` and **bold**.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    """Cells as text, row by row; `numeric` marks the right-aligned columns (None: all left-aligned)."""

    header: list[str]
    rows: list[list[str]]
    numeric: list[bool] | None = None  # right-aligned columns


@dataclass
class Image:
    """A PNG already written beside the report, with its caption."""

    path: Path
    caption: str


@dataclass
class Section:
    """A heading and its blocks, in order."""

    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Tables, Images
