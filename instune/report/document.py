"""A report as a list of sections, written as one self-contained HTML file and a Markdown summary.

The HTML embeds every image as base64, so the one file can be mailed or attached to a ticket. The Markdown
summary holds the same text and tables and links the images, written beside it in `<name>_images/`.

    write_report(out_dir, "sweep lr", [Text("..."), Table(columns, rows, title="trials"), Image(png_bytes)])
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

from instune.atomic import atomic_dir, write_text
from instune.report.format import format_cell, markdown_table


@dataclass
class Text:
    body: str  # paragraphs separated by blank lines
    title: str | None = None


@dataclass
class Code:
    body: str  # shown verbatim: a config, a log excerpt
    title: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list]  # cells as format.format_cell shows them: 4 significant digits, None and NaN as "-"
    title: str | None = None
    caption: str | None = None


@dataclass
class Image:
    source: bytes | str | os.PathLike  # PNG or JPEG bytes, or a path to such a file
    title: str | None = None
    caption: str | None = None


Section = Text | Code | Table | Image


@dataclass
class ReportPaths:
    html: Path
    markdown: Path


def image_bytes(image: Image) -> bytes:
    return image.source if isinstance(image.source, bytes) else Path(image.source).read_bytes()


def image_type(data: bytes) -> str:
    """'png' or 'jpeg', from the file's magic number."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    raise ValueError("report images must be PNG or JPEG")


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .3em; }
section { margin: 2em 0; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; }
.caption { color: #555; font-size: 13px; }
"""


def _html_section(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"] if section.title else []
    if isinstance(section, Text):
        parts += [f"<p>{html.escape(p.strip())}</p>" for p in section.body.split("\n\n") if p.strip()]
    elif isinstance(section, Code):
        parts.append(f"<pre>{html.escape(section.body)}</pre>")
    elif isinstance(section, Table):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
        body = "".join(
            "<tr>" + "".join(f'<td class="num">{html.escape(format_cell(v))}</td>' if isinstance(v, (int, float))
                             else f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>"
            for row in section.rows)
        parts.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
        if section.caption:
            parts.append(f'<p class="caption">{html.escape(section.caption)}</p>')
    elif isinstance(section, Image):
        data = image_bytes(section)
        alt = html.escape(section.caption or section.title or "figure", quote=True)
        parts.append(f'<img alt="{alt}" src="data:image/{image_type(data)};base64,'
                     f'{base64.b64encode(data).decode("ascii")}">')
        if section.caption:
            parts.append(f'<p class="caption">{html.escape(section.caption)}</p>')
    else:
        raise TypeError(f"not a report section: {type(section).__name__}")
    return "<section>\n" + "\n".join(parts) + "\n</section>"


def render_html(title: str, sections: list[Section]) -> str:
    body = "\n".join(_html_section(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def render_markdown(title: str, sections: list[Section], image_names: dict[int, str]) -> str:
    """Markdown for `sections`; image i links to `image_names[i]`."""
    out = [f"# {title}"]
    for i, s in enumerate(sections):
        if s.title:
            out.append(f"## {s.title}")
        if isinstance(s, Text):
            out.append(s.body.strip())
        elif isinstance(s, Code):
            out.append(f"```\n{s.body.rstrip()}\n```")
        elif isinstance(s, Table):
            out.append(markdown_table(s.columns, s.rows))
        elif isinstance(s, Image):
            out.append(f"![{s.caption or s.title or 'figure'}]({image_names[i]})")
        if isinstance(s, (Table, Image)) and s.caption:
            out.append(f"*{s.caption}*")
    return "\n\n".join(out) + "\n"


def write_report(out_dir: str | os.PathLike, title: str, sections: list[Section],
                 name: str = "report") -> ReportPaths:
    """Write `<name>.html` (self-contained) and `<name>.md` (+ `<name>_images/`) under `out_dir`."""
    out_dir = Path(out_dir)
    images = {i: s for i, s in enumerate(sections) if isinstance(s, Image)}
    image_names = {}
    if images:
        folder = f"{name}_images"
        with atomic_dir(out_dir / folder) as tmp:
            for n, (i, image) in enumerate(images.items(), 1):
                data = image_bytes(image)
                image_names[i] = f"{folder}/figure_{n:02d}.{image_type(data).replace('jpeg', 'jpg')}"
                (tmp / Path(image_names[i]).name).write_bytes(data)
    html_path = write_text(out_dir / f"{name}.html", render_html(title, sections))
    md_path = write_text(out_dir / f"{name}.md", render_markdown(title, sections, image_names))
    return ReportPaths(html_path, md_path)
