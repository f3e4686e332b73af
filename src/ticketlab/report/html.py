"""One self-contained HTML page: figures embedded as base64 PNG, tables of numbers.

No external URL is referenced (no scripts, fonts or stylesheets from elsewhere),
so the page opens from disk with no server.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f2f2f2; } td.text { text-align: left; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
details { margin: 0.5em 0; }
"""


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list[str]]
    source: str = ""  # what the numbers come from (a results.csv path)


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    tables: list[Table] = field(default_factory=list)
    raw_tables: list[Table] = field(default_factory=list)  # folded away by default


def img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _cell(value: str) -> str:
    text = html.escape(str(value))
    try:
        float(value)
        return f"<td>{text}</td>"
    except (TypeError, ValueError):
        return f'<td class="text">{text}</td>'


def table_html(t: Table) -> str:
    src = f' data-source="{html.escape(t.source)}"' if t.source else ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in t.rows)
    return (
        f'<table class="numbers"{src}><caption>{html.escape(t.caption)}</caption>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"
    )


def render(title: str, intro: str, sections: list[Section]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{intro}</p>",
    ]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{s.text}</p>")
        for png, caption in s.figures:
            parts.append(
                f'<figure class="figure" data-name="{html.escape(Path(png).name)}">'
                f"{img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        for t in s.tables:
            parts.append(table_html(t))
        for t in s.raw_tables:
            parts.append(f"<details><summary>{html.escape(t.caption)}</summary>")
            parts.append(table_html(t))
            parts.append("</details>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
