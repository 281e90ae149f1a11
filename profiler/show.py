"""Show what the profiler gathered: tables for people (rich), nothing computed here."""
from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from estimator.categories import Category
from estimator.units import MiB
from profiler.analysis.validate import summary_label
from profiler.record import Record


def record_tables(record: Record) -> tuple[Table, Table]:
    """Per phase: measured peak beside the prediction; then per category at the peak."""
    m, p = record.measured, record.predicted
    table = Table(title=f"{record.case.model} on {record.backend}: {record.status} {record.message}".strip())
    table.add_column("phase")
    table.add_column("measured peak MiB", justify="right")
    table.add_column("predicted MiB", justify="right")
    table.add_column("error", justify="right")
    for phase, v in m.phases.items():
        pred = p.phases.get(phase) if p else None
        pt = sum(x for k, x in pred.items() if k not in (Category.ALLOCATOR.value, Category.CONTEXT.value)) \
            if pred else None
        ma = v.peak_allocated_bytes
        table.add_row(phase, f"{ma / MiB:,.1f}", "-" if pt is None else f"{pt / MiB:,.1f}",
                      "-" if pt is None or not ma else f"{100 * (pt - ma) / ma:+.2f}%")
    cats = Table(title="at the peak, per category (MiB)")
    cats.add_column("category")
    cats.add_column("measured", justify="right")
    cats.add_column("predicted", justify="right")
    measured = m.categories or {}
    for name, value in (p.components if p else {}).items():
        cats.add_row(name, f"{measured.get(name, 0) / MiB:,.1f}", f"{value / MiB:,.1f}")
    return table, cats


def summary_table(summaries: dict[str, dict[str, float]], title: str) -> Table:
    """median / p95 / max |error| per predictor."""
    table = Table(title=title)
    for col in ("predictor", "median |error|", "p95", "max"):
        table.add_column(col, justify="left" if col == "predictor" else "right")
    for name, s in summaries.items():
        table.add_row(summary_label(name), f"{100 * s['median']:.2f}%", f"{100 * s['p95']:.2f}%",
                      f"{100 * s['max']:.2f}%")
    return table


def print_records(records: Sequence[Record]) -> None:
    from estimator.report import print_table
    for record in records:
        if record.rank is not None:
            print(f"rank {record.rank} of {record.world_size}")
        for table in record_tables(record):
            print_table(table)
