"""Benchmark tables as HTML pages, so the Snakemake report shows the tables themselves.

Arrow of the DESIGN.md picture: metrics -> **tables** (``benchmark.html``, ``superres.html``
beside their ``.md``). The markdown the report module writes (headings, paragraphs, pipe tables)
is turned into one self-contained HTML page; nothing else of markdown is needed.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from histomap.outputs import write_text_atomic

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0 1.6em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
"""


def _inline(text: str) -> str:
    """Escape, then **bold**, _italic_ / *italic* and `code`."""
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    text = re.sub(r"(?<![\w*])[_*](?!\s)(.+?)(?<!\s)[_*](?![\w*])", r"<i>\1</i>", text)
    return text


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, align = _cells(lines[0]), _cells(lines[1])
    right = [a.endswith(":") and not a.startswith(":") for a in align]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"]
    for line in lines[2:]:
        cells = _cells(line)
        out.append("<tr>" + "".join(
            f'<td class="num">{_inline(c)}</td>' if i < len(right) and right[i]
            else f"<td>{_inline(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def markdown_html(markdown: str, title: str) -> str:
    """A standalone HTML page of ``markdown`` (headings, paragraphs, pipe tables)."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        if heading:
            level = len(heading.group(1))
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and \
                re.match(r"^\s*\|?\s*:?-{2,}", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            blocks.append(_table(lines[i:j]))
            i = j
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("#", "|")):
            para.append(lines[i].strip())
            i += 1
        if para:
            blocks.append(f"<p>{_inline(' '.join(para))}</p>")
        else:  # a lone table-looking line without a separator row
            blocks.append(f"<p>{_inline(lines[i].strip())}</p>")
            i += 1
    body = "\n".join(blocks)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_html(markdown_path: str | Path, out_html: str | Path, title: str) -> Path:
    """The HTML page of a markdown table file (atomically written)."""
    text = Path(markdown_path).read_text(encoding="utf-8")
    write_text_atomic(out_html, markdown_html(text, title))
    return Path(out_html)
