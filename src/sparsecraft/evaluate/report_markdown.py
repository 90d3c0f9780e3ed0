"""Rendering the comparison report (`report_doc` sections) as Markdown: `report.md`, its PNGs linked by name
from the same directory."""

from __future__ import annotations

import html

from .report_doc import Image, Section, Table


def _md_text(text: str) -> str:
    """Run, method and task names come from users' folders and recipes: raw HTML in them must show as text
    (Markdown renders `<`, `>` and `&` as HTML otherwise)."""
    return html.escape(str(text), quote=False)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: list[Section]) -> str:
    """The whole report as Markdown: the first section a `#` heading, the others `##`; tables as pipe tables."""
    lines = []
    for i, section in enumerate(sections):
        lines += [f"{'#' if i == 0 else '##'} {_md_text(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                align = block.numeric or [False] * len(block.header)
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "|".join("---:" if a else "---" for a in align) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                caption = _md_text(block.caption)
                lines.append(f"![{caption}]({block.path.name})")
                lines.append("")
                lines.append(f"*{caption}*")
            else:
                lines.append(_md_text(block))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
