"""Show what the profiler gathered: tables for people (rich), nothing computed here."""
from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.table import Table

from estimator.categories import Category
from estimator.units import GiB, MiB
from profiler.analysis.validate import Validation, summary_label
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


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


#: Tensor categories by a short name, for a column that fits 80 columns
_CATEGORY_SHORT = {"weights": "weights", "gradients": "grads", "optimizer_state": "optim", "activations": "acts",
                   "logits": "logits", "kv_cache": "kv", "temporaries": "temps"}


def cases_table(v: Validation) -> Table:
    """Per case, folded to the terminal: measured peak, vramlab's error uncalibrated and
    calibrated (leave-one-out), and the category the estimate misplaces most. ``validate
    --wide`` prints every predictor and category (the report's markdown tables)."""
    gpu = any(r.reserved for r in v.rows)
    table = Table(title="per case: measured peak (GiB = 2^30 B) and errors as a share of it", box=box.SIMPLE_HEAD,
                  caption="vramlab: the estimate; LOO: calibrated on the other cases (leave-one-out); worst: "
                          "the category whose estimate - measured is largest at the peak ("
                          + ", ".join(f"{short} = {name}" for name, short in _CATEGORY_SHORT.items() if short != name)
                          + ")" + ("; reserved: vs max_memory_reserved" if gpu else "")
                          + "; --wide: every predictor and category")
    table.add_column("case")
    table.add_column("GiB", justify="right")
    table.add_column("vramlab", justify="right")
    table.add_column("LOO", justify="right")
    if gpu:
        table.add_column("reserved", justify="right")
    table.add_column("worst", no_wrap=True)
    for r in v.rows:
        errors = r.category_errors()
        worst = max(errors, key=lambda c: abs(errors[c]))
        cells = [r.label, f"{r.measured / GiB:.2f}", _pct(r.error(r.uncalibrated)), _pct(r.loo_error)]
        if gpu:
            cells.append(_pct((r.predicted_reserved - r.reserved) / r.reserved)
                         if r.reserved and r.predicted_reserved else "-")
        cells.append(f"{_CATEGORY_SHORT.get(worst, worst)} {_pct(errors[worst])}")
        table.add_row(*cells)
    return table


def print_records(records: Sequence[Record], wide: bool = False) -> None:
    from estimator.report import print_table, print_text
    for record in records:
        if record.rank is not None:
            print_text(f"rank {record.rank} of {record.world_size}", wide=wide)
        for table in record_tables(record):
            print_table(table, wide=wide)


#: The published metrics by a short name (the rest: their first word).
_METRIC_SHORT = {"max_memory_allocated": "allocated", "max_memory_reserved": "reserved"}


def published_tables(result) -> tuple[Table, Table]:
    """``validate --published`` folded to the terminal: every row with vramlab's error, the
    left-out ones by a numbered reason; then the reasons, each once. ``--wide`` prints every
    predictor's error and the reasons in full (markdown)."""
    reasons: dict[str, int] = {}
    counts: dict[str, int] = {}
    rows = Table(title="every published row: vramlab's error against the published value", box=box.SIMPLE_HEAD,
                 caption="MB = 10^6 bytes; pinned rows make the headline above; no [n]: left out for reason n "
                         "below; --wide: every predictor's error")
    for col, just in (("row", "left"), ("configuration", "left"), ("metric", "left"), ("published MB", "right"),
                      ("vramlab", "right"), ("pinned", "left")):
        rows.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in result.rows:
        pinned = "yes"
        if not r.pinned:
            why = "; ".join(r.excluded_because) or "not stated"
            n = reasons.setdefault(why, len(reasons) + 1)
            counts[why] = counts.get(why, 0) + 1
            pinned = f"no [{n}]"
        metric = _METRIC_SHORT.get(r.metric, r.metric.split(":")[0])
        rows.add_row(r.id, r.label, metric, "" if r.measured is None else f"{r.measured / 1e6:,.1f}",
                     _pct(r.error("vramlab")) if r.error("vramlab") is not None else "", pinned)
    why = Table(title="rows left out, by reason", box=box.SIMPLE_HEAD)
    why.add_column("n", justify="right")
    why.add_column("rows", justify="right")
    why.add_column("reason")
    for text, n in reasons.items():
        why.add_row(str(n), str(counts[text]), text)
    return rows, why
