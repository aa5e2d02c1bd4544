"""Results tables: ``metrics.csv`` / ``metrics.json`` (fractions) and ``metrics.md`` (percentages), written atomically.

One row per category, then ``mean`` (unweighted over categories). Undefined values are ``nan`` in CSV, ``null`` in
JSON and ``–`` in Markdown.

Example:
    >>> rows = results_rows({"bottle": {"image_auroc": 0.91}}, ["image_auroc"])
    >>> print(format_markdown(rows, ["image_auroc"]))
    | category | image AUROC |
    |---|---|
    | bottle | 91.0 |
    | mean | 91.0 |
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from zsad.atomic import atomic_write_text
from zsad.metrics.per_category import unweighted_mean

__all__ = ["COLUMN_LABELS", "format_markdown", "print_results", "results_rows", "write_results"]

MEAN_ROW = "mean"
COLUMN_LABELS = {
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1max": "image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1max": "pixel F1-max",
    "pixel_aupro": "pixel AU-PRO",
    "pixel_pro_repo": "pixel PRO (repo)",
}


Row = dict[str, str | float]


def results_rows(per_category: dict[str, dict[str, float]], columns: Sequence[str]) -> list[Row]:
    """Rows ``{"category": name, column: value}`` for each category (in the given order), then the mean row."""
    rows: list[Row] = [
        {"category": name, **{c: values.get(c, math.nan) for c in columns}} for name, values in per_category.items()
    ]
    rows.append({"category": MEAN_ROW, **unweighted_mean(per_category, columns)})
    return rows


def _percent(value: float | str) -> str:
    return "–" if isinstance(value, str) or math.isnan(value) else f"{100.0 * value:.1f}"


def format_markdown(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A Markdown table in percentages with one decimal."""
    header = "| category | " + " | ".join(COLUMN_LABELS.get(c, c) for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([str(r["category"])] + [_percent(r[c]) for c in columns]) + " |" for r in rows]
    return "\n".join(lines)


def _format_csv(rows: Sequence[Row], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *columns])
    # repr() keeps every digit of the float (17 significant), so the CSV reproduces the exact values.
    writer.writerows([[r["category"], *(repr(float(r[c])) for c in columns)] for r in rows])
    return buffer.getvalue()


def _format_json(rows: Sequence[Row], columns: Sequence[str]) -> str:
    clean = [
        {"category": r["category"], **{c: None if math.isnan(float(r[c])) else float(r[c]) for c in columns}}
        for r in rows
    ]
    return json.dumps(clean, indent=2) + "\n"


def write_results(out_dir: str | Path, rows: Sequence[Row], columns: Sequence[str]) -> dict[str, Path]:
    """Write ``metrics.csv``, ``metrics.json`` and ``metrics.md`` into ``out_dir`` atomically.

    Args:
        out_dir: Run directory.
        rows: Output of :func:`results_rows`.
        columns: Metric columns in order.

    Returns:
        Format name to written path.
    """
    out_dir = Path(out_dir)
    written = {}
    for fmt, text in (
        ("csv", _format_csv(rows, columns)),
        ("json", _format_json(rows, columns)),
        ("md", format_markdown(rows, columns) + "\n"),
    ):
        path = out_dir / f"metrics.{fmt}"
        atomic_write_text(path, text)
        written[fmt] = path
    return written


def print_results(rows: Sequence[Row], columns: Sequence[str], title: str | None = None) -> None:
    """Print the table in percentages (rich when available, else Markdown)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but printing must never fail a test run
        if title:
            print(title)
        print(format_markdown(rows, columns))
        return
    table = Table(title=title)
    table.add_column("category")
    for column in columns:
        table.add_column(COLUMN_LABELS.get(column, column), justify="right")
    for i, row in enumerate(rows):
        table.add_row(str(row["category"]), *(_percent(row[c]) for c in columns), end_section=i == len(rows) - 2)
    console = Console()
    if not console.is_terminal:  # log files / captured output: do not squeeze eight columns into 80 characters
        console = Console(width=160)
    console.print(table)
