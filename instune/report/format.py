"""How every report shows things: one cell format, one Markdown table, one way to draw and save a figure.

The data report (data/data_report.py), the run and eval report (report/sections.py, report/document.py) and the
sweep results (tune/results.py) all use these, so a number reads the same in each. matplotlib is imported
only when a figure is drawn, and always with its Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math
from pathlib import Path


def format_cell(value) -> str:
    """A value as one table cell: "-" for missing (None, NaN), 4 significant digits for floats, thousands
    separators for integers, and any text on one line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return " ".join(str(value).split())


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table; columns holding only numbers are right-aligned, and a pipe in a cell is escaped."""

    def line(cells):
        return "| " + " | ".join(format_cell(c).replace("|", "\\|") for c in cells) + " |"

    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]
    return "\n".join([line(columns), "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
                      *(line(r) for r in rows)])


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (100 dpi, cropped to what is drawn); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig, path: Path) -> Path:
    """Write the figure to `path` as PNG (figure_png); returns `path`."""
    path.write_bytes(figure_png(fig))
    return path
