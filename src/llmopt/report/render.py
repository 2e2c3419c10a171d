"""Render report sections to one self-contained HTML page (images inlined as base64) and to Markdown."""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
     padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:12px;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;position:sticky;top:0}td.t{text-align:left}
tr.bad td{background:#fde8e8}tr.skip td{background:#f6f6f6;color:#666}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
p.note{font-size:13px;color:#444}code{background:#f4f4f4;padding:0 3px}
nav a{margin-right:1em;font-size:13px}
"""


@dataclass
class Table:
    columns: list  # (key, header, format) with format a str.format spec or None; a bare key: (key, key, None)
    rows: list
    row_class: str | None = None  # key of a row field holding a CSS class ("bad", "skip")

    def __post_init__(self):
        self.columns = [(c, c, None) if isinstance(c, str) else tuple(c) for c in self.columns]


@dataclass
class Section:
    title: str
    paragraphs: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)  # (caption, Path to PNG)

    @property
    def anchor(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")


def fmt(value, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec and isinstance(value, (int, float)):
        try:
            return format(value, spec)
        except ValueError:
            return str(value)
    return str(value)


def _img_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def render_html(sections: list[Section], title: str) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><nav>"]
    parts += [f"<a href='#{s.anchor}'>{html.escape(s.title)}</a>" for s in sections]
    parts.append("</nav>")
    for s in sections:
        parts.append(f"<h2 id='{s.anchor}'>{html.escape(s.title)}</h2>")
        parts += [f"<p class='note'>{html.escape(p)}</p>" for p in s.paragraphs]
        for t in s.tables:
            parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in t.columns)
                         + "</tr></thead><tbody>")
            for row in t.rows:
                cls = f" class='{row.get(t.row_class)}'" if t.row_class and row.get(t.row_class) else ""
                cells = "".join(f"<td{'' if isinstance(row.get(k), (int, float)) else ' class=t'}>"
                                f"{html.escape(fmt(row.get(k), f))}</td>" for k, _, f in t.columns)
                parts.append(f"<tr{cls}>{cells}</tr>")
            parts.append("</tbody></table>")
            if not t.rows:
                parts.append("<p class='note'>(none)</p>")
        parts += [_img_tag(path, cap) for cap, path in s.figures]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(sections: list[Section], title: str, out_dir: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for p in s.paragraphs:
            lines += [p, ""]
        for t in s.tables:
            if not t.rows:
                lines += ["(none)", ""]
                continue
            lines.append("| " + " | ".join(h for _, h, _ in t.columns) + " |")
            lines.append("|" + "---|" * len(t.columns))
            for row in t.rows:
                lines.append("| " + " | ".join(fmt(row.get(k), f).replace("|", "\\|").replace("\n", " ")
                                               for k, _, f in t.columns) + " |")
            lines.append("")
        for cap, path in s.figures:
            lines += [f"![{cap}]({os.path.relpath(path, out_dir)})", ""]
    return "\n".join(lines)
