"""Rendering the comparison report (`report_doc` sections) as one self-contained HTML page: CSS inline,
images embedded as base64 data URIs, so `report.html` can be sent on its own."""

from __future__ import annotations

import base64
import html
import re

from .report_doc import Image, Section, Table

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; }
th { background: #f3f5f7; text-align: left; }
td:first-child { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
code { background: #f3f5f7; padding: 0 3px; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the report's text uses: `code` and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_html(sections: list[Section]) -> str:
    """A self-contained page: CSS inline, images as base64 data URIs."""
    title = sections[0].title if sections else "report"
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>"]
    for i, section in enumerate(sections):
        tag = "h1" if i == 0 else "h2"
        parts.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        for block in section.blocks:
            if isinstance(block, Table):
                align = block.numeric or [False] * len(block.header)
                parts.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in block.header)
                             + "</tr></thead><tbody>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td class=\"num\">{_inline(c)}</td>" if a else
                                                  f"<td>{_inline(c)}</td>" for c, a in zip(row, align)) + "</tr>")
                parts.append("</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                parts.append(f"<figure><img alt=\"{html.escape(block.caption)}\" src=\"data:image/png;base64,"
                             f"{data}\"><figcaption>{_inline(block.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{_inline(str(block))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
