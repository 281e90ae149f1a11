"""Show what the estimator gathered: tables for people (rich), nothing computed here."""
from __future__ import annotations

from typing import List

from rich.console import Console
from rich.table import Table

from .categories import Category, TENSOR_CATEGORIES
from .estimate import Estimate
from .fit import FitResult
from .rules import GB, RuleRow
from .units import GiB


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def estimate_table(est: Estimate) -> Table:
    s = est.setup
    title = (f"{est.model}: {s.mode} {s.precision}, {s.optimizer}, batch {s.batch} x seq {s.seq}"
             f"{', grad-ckpt' if s.grad_ckpt else ''}, {s.attn}, {s.device}"
             f"{f', {s.sharding} x{s.world_size} (per rank)' if s.world_size > 1 else ''}")
    table = Table(title=title, caption=f"params {est.params:,}, trainable {est.trainable_params:,}; "
                                      f"peak in the {est.peak_phase} phase; overheads: {est.overheads_source}")
    table.add_column("category")
    table.add_column("GiB at peak", justify="right")
    table.add_column("share", justify="right")
    for phase in est.phases:
        table.add_column(f"{phase} GiB", justify="right", style="dim")
    total = est.total_bytes or 1
    for cat in Category:
        value = est.components[cat]
        table.add_row(cat.value, _gib(value), f"{100 * value / total:.1f}%",
                      *(_gib(comp[cat]) for comp in est.phases.values()))
    table.add_section()
    table.add_row("allocated (tensors)", _gib(est.allocated_bytes), "",
                  *(_gib(sum(v for k, v in c.items() if k in TENSOR_CATEGORIES)) for c in est.phases.values()))
    table.add_row("total", _gib(est.total_bytes), "100.0%",
                  *(_gib(sum(c.values())) for c in est.phases.values()), style="bold")
    return table


def fit_table(result: FitResult) -> Table:
    budget = result.memory_bytes
    table = Table(title=f"{result.model} in {_gib(budget)} GiB: as given {_gib(result.estimate.total_bytes)} GiB "
                        f"({'fits' if result.fits else 'does not fit'}); largest batch {result.max_batch} "
                        f"at seq {result.setup.seq}; longest seq {result.max_seq} at batch {result.setup.batch}")
    table.add_column("strategy (cheapest first)")
    table.add_column("GiB", justify="right")
    table.add_column("fits", justify="center")
    table.add_column("largest batch", justify="right")
    for st in result.strategies:
        table.add_row(st.name, _gib(st.total_bytes), "yes" if st.fits else "no", str(st.max_batch))
    return table


def rules_tables(rows: List[RuleRow]) -> Table:
    table = Table(title="Rules of thumb (REFERENCE.md) beside the detailed estimate, in GB (10^9 bytes)",
                  caption="batch 1 x seq 512 unless said; the estimate is the step's peak on one CUDA GPU")
    for col, just in (("size", "left"), ("model", "left"), ("setting", "left"), ("rule GB", "right"),
                      ("estimate GB", "right"), ("ZeRO-3 on H100 80GB: GPUs x GB each", "right"),
                      ("what the rule leaves out (GB)", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        if r.rule_low_bytes == r.rule_high_bytes:
            rule = f"{r.rule_low_bytes / GB:,.1f}"
        elif r.rule_high_bytes is None:
            rule = f"> {r.rule_low_bytes / GB:,.0f}"
        else:
            rule = f"{r.rule_low_bytes / GB:,.0f}-{r.rule_high_bytes / GB:,.0f}"
        causes = "; ".join(f"{why} {b / GB:+,.1f}" for why, b in r.causes)
        per_gpu = "-" if r.per_gpu is None else f"{r.per_gpu[0]} x {r.per_gpu[1] / GB:,.1f}"
        table.add_row(r.size, f"{r.model} ({r.params / 1e9:.2f}B)", r.setting, rule,
                      f"{r.estimate.total_bytes / GB:,.1f}", per_gpu, causes)
    return table


def print_table(table: Table) -> None:
    Console(width=max(Console().width, 120)).print(table)
