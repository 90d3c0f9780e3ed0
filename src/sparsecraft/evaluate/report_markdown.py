"""Rendering the comparison report (`report_doc` sections) as Markdown: `report.md`, its PNGs linked by name
from the same directory."""

from __future__ import annotations

from .report_doc import Image, Section, Table


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    """The whole report as Markdown: the first section a `#` heading, the others `##`; tables as pipe tables."""
    lines = []
    for i, section in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                align = block.numeric or [False] * len(block.header)
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---:" if a else "---" for a in align) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                lines.append(f"![{block.caption}]({block.path.name})")
                lines.append("")
                lines.append(f"*{block.caption}*")
            else:
                lines.append(str(block))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
