"""The experiment's table from its cell directories, wherever they ran: aggregation, Markdown / CSV / JSON, figure.

For each method, protocol and metric: the mean over categories of each cell (every category weighing the same, a
category where the metric is undefined left out, as ``ZSADEvaluator``'s ``mean`` row), then over seeds the mean, the
sample standard deviation (n − 1), n and a 95 % Student-t confidence interval ``mean ± t(0.975, n − 1) · sd / √n``.
With n = 1 there is no standard deviation and no interval, and the table says so. The paper's number and the
difference ``ours − paper`` (percentage points) complete each entry.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zsad.atomic import atomic_path, atomic_write_text
from zsad.experiment.spec import METRIC_LABELS, ExperimentSpec

__all__ = ["Summary", "build_table", "category_mean", "collect_cells", "seed_summary", "write_table"]

SMOKE_BANNER = (
    "> **SMOKE RUN — the numbers are meaningless.** Every cell ran on the tiny random-weight CLIP, generated data "
    "and one epoch; they show that the grid runs end to end, nothing about any method."
)
COUNT_METRICS = ("trainable_parameters", "total_parameters")


@dataclass
class Summary:
    """One method × protocol × metric entry of the table (values in the table's unit: % or raw)."""

    method: str
    protocol: str
    metric: str
    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    paper: float | None
    diff: float | None
    values: list[float]
    status: str


def category_mean(rows: Sequence[dict[str, Any]], metric: str) -> float:
    """Unweighted mean of ``metric`` over the category rows of a ``metrics.json`` (``mean`` row if it is alone).

    ``None`` / NaN entries (undefined metrics) are left out; NaN when no category has a value.
    """
    categories = [r for r in rows if r.get("category") != "mean"] or list(rows)
    values = [float(r[metric]) for r in categories if r.get(metric) is not None and not math.isnan(float(r[metric]))]
    return sum(values) / len(values) if values else math.nan


def seed_summary(values: Sequence[float]) -> tuple[int, float | None, float | None, float | None, float | None]:
    """``(n, mean, sd, ci_low, ci_high)`` over seeds: sample sd (n − 1 dof) and the 95 % Student-t interval.

    NaN values (a metric undefined in a cell) are left out. n = 1 gives no sd and no interval (``None``).
    """
    from scipy import stats

    finite = [float(v) for v in values if not math.isnan(float(v))]
    n = len(finite)
    if n == 0:
        return 0, None, None, None, None
    mean = sum(finite) / n
    if n == 1:
        return 1, mean, None, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return n, mean, std, mean - half, mean + half


def collect_cells(directory: Path) -> list[dict[str, Any]]:
    """Every ``cells/**/cell.json`` under ``directory`` with its ``metrics.json`` rows (``None`` when unfinished)."""
    cells = []
    for record_path in sorted(Path(directory).glob("cells/**/cell.json")):
        if "categories" in record_path.relative_to(directory).parts:
            continue
        record = json.loads(record_path.read_text())
        metrics_path = record_path.parent / "results" / "metrics.json"
        record["dir"] = str(record_path.parent)
        record["rows"] = (
            json.loads(metrics_path.read_text()) if record.get("status") == "done" and metrics_path.is_file() else None
        )
        cells.append(record)
    return cells


def _scale(spec: ExperimentSpec, metric: str) -> float:
    return 1.0 if spec.kind == "benchmark" else 100.0  # metrics.json holds fractions; the papers print %


def build_table(spec: ExperimentSpec, cells: Sequence[dict[str, Any]], unavailable: dict[str, str]) -> list[Summary]:
    """One :class:`Summary` per method, protocol and metric (spec order), from the collected cell records."""
    summaries = []
    for method in spec.methods.values():
        for protocol in spec.protocols:
            mine = [c for c in cells if c["method"] == method.key and c["protocol"] == protocol]
            done = [c for c in mine if c["rows"] is not None]
            failed = [c for c in mine if c.get("status") == "failed"]
            if method.key in unavailable and not mine:
                status = f"not available: {unavailable[method.key]}"
            elif not mine:
                status = "not run"
            elif failed and not done:
                status = "failed"
            elif len(done) < len(mine):
                status = f"{len(done)} of {len(mine)} cells finished"
            else:
                status = "done"
            for metric in spec.metrics:
                values = [
                    category_mean(c["rows"], metric) * _scale(spec, metric)
                    for c in sorted(done, key=lambda c: c["seed"])
                ]
                n, mean, std, low, high = seed_summary(values)
                paper = method.paper.get(protocol, {}).get(metric)
                diff = None if paper is None or mean is None else mean - paper
                summaries.append(
                    Summary(method.key, protocol, metric, n, mean, std, low, high, paper, diff, values, status)
                )
    return summaries


def _fmt(value: float | None, spec: ExperimentSpec, metric: str, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "–"
    if metric in COUNT_METRICS:
        from zsad.benchmark import human_count

        return human_count(int(round(value)))
    digits = spec.decimals if spec.kind == "metrics" else 2
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _entry(s: Summary, spec: ExperimentSpec) -> str:
    """``91.0 ± 0.3 (n=3) · paper 91.3 (−0.3)`` — or the status when nothing finished."""
    if s.mean is None:
        text = "n/a" if s.status.startswith("not available") else s.status
    else:
        text = _fmt(s.mean, spec, s.metric)
        if s.std is not None:
            text += f" ± {_fmt(s.std, spec, s.metric)}"
        text += f" (n={s.n})"
    if s.paper is not None:
        text += f" · paper {_fmt(s.paper, spec, s.metric)}"
        if s.diff is not None:
            text += f" ({_fmt(s.diff, spec, s.metric, signed=True)})" if s.metric not in COUNT_METRICS else ""
    return text


def format_markdown(
    spec: ExperimentSpec, summaries: Sequence[Summary], smoke: bool, cells: Sequence[dict[str, Any]]
) -> str:
    """``table.md``: a row per method, a column per protocol and metric, then intervals and cell status."""
    unit = "raw counts and images/s" if spec.kind == "benchmark" else "%"
    lines = [f"# {spec.title}", ""]
    if smoke:
        lines += [SMOKE_BANNER, ""]
    lines += [
        f"Experiment `{spec.name}` ({spec.path.name}). Each entry: the mean over categories of each run, then the "
        f"mean ± sample standard deviation over seeds (n = seeds finished), {unit}; `paper` is the published "
        "number and (±x) the difference ours − paper. 95 % confidence intervals below.",
        "",
    ]
    by_key = {(s.method, s.protocol, s.metric): s for s in summaries}
    header = ["method"] + [
        f"{spec.protocols[p].label} {METRIC_LABELS.get(m, m)}" for p in spec.protocols for m in spec.metrics
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in spec.methods.values():
        first = by_key[(method.key, next(iter(spec.protocols)), spec.metrics[0])]
        label = method.label + (" — not available" if first.status.startswith("not available") else "")
        row = [label] + [_entry(by_key[(method.key, p, m)], spec) for p in spec.protocols for m in spec.metrics]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## 95 % confidence intervals (Student t, n − 1 degrees of freedom)",
        "",
        "| method | protocol | metric | n | mean | sd | 95 % CI | paper | ours − paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if s.mean is None:
            continue
        interval = (
            "n = 1: no interval"
            if s.n == 1
            else f"[{_fmt(s.ci_low, spec, s.metric)}, {_fmt(s.ci_high, spec, s.metric)}]"
        )
        lines.append(
            f"| {spec.methods[s.method].label} | {spec.protocols[s.protocol].label} | "
            f"{METRIC_LABELS.get(s.metric, s.metric)} | {s.n} | {_fmt(s.mean, spec, s.metric)} | "
            f"{_fmt(s.std, spec, s.metric)} | {interval} | {_fmt(s.paper, spec, s.metric)} | "
            f"{_fmt(s.diff, spec, s.metric, signed=True)} |"
        )
    lines += ["", "## Rows and cells", ""]
    for method in spec.methods.values():
        statuses = sorted({by_key[(method.key, p, spec.metrics[0])].status for p in spec.protocols})
        note = f" {method.note}" if method.note else ""
        lines.append(f"- **{method.label}**: {'; '.join(statuses)}.{note}")
    failed = [c for c in cells if c.get("status") == "failed"]
    for cell in failed:
        lines.append(
            f"- FAILED cell `{cell['id']}`: {cell.get('error', '')[:200]} (traceback: `cells/{cell['id']}/error.txt`)"
        )
    lines += [f"- {note}" for note in spec.notes]
    return "\n".join(lines) + "\n"


def _csv(summaries: Sequence[Summary]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    fields = ["method", "protocol", "metric", "n", "mean", "std", "ci_low", "ci_high", "paper", "diff", "status"]
    writer.writerow(fields)
    for s in summaries:
        row = asdict(s)
        writer.writerow(
            ["" if row[f] is None else (repr(row[f]) if isinstance(row[f], float) else row[f]) for f in fields]
        )
    return buffer.getvalue()


def _figure(spec: ExperimentSpec, summaries: Sequence[Summary], path: Path, smoke: bool) -> Path | None:
    """Grouped bars per metric, one panel per method, a bar per protocol (seed 003's Figure 1)."""
    if not spec.figure:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(spec.figure.get("protocols", spec.protocols))
    methods = [m for m in spec.methods.values()]
    by_key = {(s.method, s.protocol, s.metric): s for s in summaries}
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    width = 0.8 / len(protocols)
    for ax, method in zip(axes.flat, methods, strict=False):
        for j, protocol in enumerate(protocols):
            entries = [by_key[(method.key, protocol, m)] for m in spec.metrics]
            xs = [i + (j - (len(protocols) - 1) / 2) * width for i in range(len(spec.metrics))]
            bars = ax.bar(
                xs,
                [e.mean if e.mean is not None else 0.0 for e in entries],
                width,
                yerr=[e.std or 0.0 for e in entries],
                label=spec.protocols[protocol].label,
                capsize=2,
            )
            papers = [(x, e.paper) for x, e in zip(xs, entries, strict=True) if e.paper is not None]
            if papers:  # the published value as a black tick over each bar
                ax.scatter(
                    [x for x, _ in papers],
                    [p for _, p in papers],
                    marker="_",
                    s=120,
                    color="black",
                    zorder=3,
                    label="paper" if j == len(protocols) - 1 else None,
                )
            del bars
        status = by_key[(method.key, protocols[0], spec.metrics[0])].status
        if status.startswith("not available"):
            ax.text(0.5, 0.5, "not available", transform=ax.transAxes, ha="center", va="center", color="grey")
            status = "not available"
        ax.set_title(method.label + ("" if status == "done" else f" ({status})"), fontsize=9)
        ax.set_xticks(range(len(spec.metrics)))
        ax.set_xticklabels([METRIC_LABELS.get(m, m) for m in spec.metrics], rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle(spec.title + (" — SMOKE RUN, numbers meaningless" if smoke else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp: re-runs equal
    plt.close(fig)
    return path


def write_table(
    spec: ExperimentSpec,
    directory: Path,
    smoke: bool,
    unavailable: dict[str, str],
    wandb_project: str | None = None,
) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv``, ``table.json`` (and ``table.png`` when the spec asks for the figure)."""
    directory = Path(directory)
    cells = collect_cells(directory)
    summaries = build_table(spec, cells, unavailable)
    written = {"md": directory / "table.md", "csv": directory / "table.csv", "json": directory / "table.json"}
    atomic_write_text(written["md"], format_markdown(spec, summaries, smoke, cells))
    atomic_write_text(written["csv"], _csv(summaries))
    payload = {
        "experiment": spec.name,
        "title": spec.title,
        "smoke": smoke,
        "unit": "raw" if spec.kind == "benchmark" else "percent",
        "metrics": spec.metrics,
        "protocols": list(spec.protocols),
        "entries": [_clean(asdict(s)) for s in summaries],
        "cells": [{k: c.get(k) for k in ("id", "status", "error")} for c in cells],
    }
    atomic_write_text(written["json"], json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    figure = _figure(spec, summaries, directory / "table.png", smoke)
    if figure:
        written["png"] = figure
    if wandb_project:
        _log_wandb(spec, summaries, wandb_project, smoke)
    return written


def _clean(value: Any) -> Any:  # noqa: ANN401
    """NaN → ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _log_wandb(spec: ExperimentSpec, summaries: Sequence[Summary], project: str, smoke: bool) -> None:
    """The table as a W&B Table in the experiment's group (a no-op with ``WANDB_MODE=disabled``)."""
    import wandb

    run = wandb.init(
        project=project,
        group=spec.name,
        job_type="table",
        name=f"{spec.name}-table",
        config={"smoke": smoke, "spec": spec.path.name},
        reinit="finish_previous",
    )
    columns = ["method", "protocol", "metric", "n", "mean", "std", "ci_low", "ci_high", "paper", "diff", "status"]
    table = wandb.Table(columns=columns, data=[[getattr(s, c) for c in columns] for s in summaries])
    run.log({f"{spec.name}/table": table})
    run.finish()
