"""Show what the estimator gathered: tables for people (rich), nothing computed here."""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .categories import TENSOR_CATEGORIES, Category, Phase
from .estimate import Estimate
from .fit import FitResult
from .rules import RuleRow
from .setup import Mode, Precision, Quant
from .units import BILLION, GB, GiB

#: A ``--wide`` view is drawn up to this many columns: every table at its natural width.
WIDE_COLUMNS = 1000


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def estimate_table(est: Estimate) -> Table:
    s = est.setup
    title = (f"{est.model}: {s.mode} {s.precision}{f', {s.optimizer}' if s.training else ''}, "
             f"batch {s.batch} x seq {s.seq}{f' + {s.new_tokens} new tokens' if s.new_tokens else ''}"
             f"{', grad-ckpt' if s.grad_ckpt else ''}, {s.attn}, {s.device}"
             f"{f', {s.quant}' if s.quant is not Quant.NONE else ''}"
             f"{f', kbit-prep {s.resolved_kbit_prep}' if s.mode is Mode.QLORA else ''}"
             f"{f', {s.sharding} x{s.world_size} (per rank)' if s.world_size > 1 else ''}"
             f"{f', {s.alloc_conf}' if s.alloc_conf else ''}")
    columns = dict(est.phases)
    if est.load_phase:
        columns[Phase.LOAD] = est.load_phase
    table = Table(title=title, box=box.SIMPLE_HEAD,
                  caption=f"GiB = 2^30 bytes; {recipe_line(s.precision)}; params {est.params:,}, trainable "
                          f"{est.trainable_params:,}; tensors peak in the {est.peak_phase} phase, reserved "
                          f"memory in the {est.reserved_phase} phase; overheads: {est.overheads_source}")
    table.add_column("category", no_wrap=True, min_width=len(Category.OPTIMIZER_STATE.value))
    table.add_column("at peak", justify="right")
    table.add_column("share", justify="right")
    for phase in columns:
        table.add_column(str(phase), justify="right", style="dim")
    total = est.total_bytes or 1
    for cat in Category:
        value = est.components[cat]
        table.add_row(cat.value, _gib(value), f"{100 * value / total:.1f}%",
                      *(_gib(comp[cat]) for comp in columns.values()))
    table.add_section()
    table.add_row("allocated", _gib(est.allocated_bytes), "",
                  *(_gib(sum(v for k, v in c.items() if k in TENSOR_CATEGORIES)) for c in columns.values()))
    table.add_row("reserved", _gib(est.reserved_bytes), "",
                  *(_gib(sum(v for k, v in c.items() if k is not Category.CONTEXT)) for c in columns.values()))
    table.add_row("total", _gib(est.total_bytes), "100.0%",
                  *(_gib(sum(c.values())) for c in columns.values()), style="bold")
    return table


def non_tensor_lines(est: Estimate) -> list[str]:
    """The context category by source, one line each."""
    return [f"non-tensor {name}: {_gib(int(src['bytes']))} GiB, {src['source']}"
            for name, src in est.non_tensor.items()]


#: how the fit tables name each verdict (8 characters at most: 80 columns)
VERDICT_TEXT = {"safe": "safe", "uncertain": "unsure", "does_not_fit": "no"}


def fit_table(result: FitResult) -> Table:
    budget = result.memory_bytes
    j = result.judgement
    table = Table(title=f"{result.model} in {_gib(budget)} GiB: as given {_gib(result.estimate.total_bytes)} GiB "
                        f"({str(j.verdict).replace('_', ' ')}); largest safe batch {result.max_batch} "
                        f"at seq {result.setup.seq}; longest safe seq {result.max_seq} at batch "
                        f"{result.setup.batch}",
                  caption=f"GiB = 2^30 bytes; device total = reserved + non-tensor; assumes "
                          f"{recipe_line(result.setup.precision)}", box=box.SIMPLE_HEAD)
    table.add_column("strategy (cheapest first)")
    table.add_column("GiB", justify="right")
    table.add_column("verdict", justify="center")
    table.add_column("largest safe batch", justify="right")
    for st in result.strategies:
        table.add_row(st.name, _gib(st.total_bytes), VERDICT_TEXT[st.verdict.value], str(st.max_batch))
    return table


def fit_figures_table(result: FitResult) -> Table:
    """The three figures of the setup as given and what they are measured against."""
    j, est = result.judgement, result.estimate
    table = Table(title="the setup as given: what decides out-of-memory", box=box.SIMPLE_HEAD,
                  caption=f"spread measured on {result.margin.cases} CUDA cases "
                          f"({100 * (result.margin.min_ratio - 1):+.1f} % to "
                          f"{100 * (result.margin.max_ratio - 1):+.1f} %): {result.margin.source}")
    table.add_column("figure")
    table.add_column("GiB", justify="right")
    table.add_column("what counts it")
    table.add_row("allocated", _gib(j.allocated_bytes), "max_memory_allocated: live tensors")
    table.add_row("reserved", _gib(j.reserved_bytes), f"max_memory_reserved (peak in {est.reserved_phase})")
    table.add_row("non-tensor", _gib(j.non_tensor_bytes), ", ".join(est.non_tensor) or "-")
    table.add_row("device total", _gib(j.total_bytes), "nvidia-smi: reserved + non-tensor", style="bold")
    return table


def fit_recipes_table(result: FitResult) -> Table:
    """The setup as given under each precision recipe: which one your code runs decides."""
    table = Table(title="the setup as given, per precision recipe (--precision)", box=box.SIMPLE_HEAD,
                  caption="--help says what each recipe types how and which training code runs it "
                          "(amp-bf16: a Trainer's bf16=True on an fp32-loaded model)")
    table.add_column("recipe")
    table.add_column("GiB", justify="right")
    table.add_column("verdict", justify="center")
    table.add_column("largest safe batch", justify="right")
    for r in result.recipes:
        mark = " (as given)" if r.setup.precision is result.setup.precision else ""
        table.add_row(f"{r.name}{mark}", _gib(r.total_bytes), VERDICT_TEXT[r.verdict.value], str(r.max_batch))
    return table


def recipe_line(precision: Precision) -> str:
    """``precision bf16 = pure bf16: ...``: the recipe a figure assumes, as ``--help`` defines it."""
    return f"precision {precision} = {precision.recipe}"


def _rule_text(r: RuleRow) -> str:
    if r.rule_low_bytes == r.rule_high_bytes:
        return f"{r.rule_low_bytes / GB:,.1f}"
    if r.rule_high_bytes is None:
        return f"> {r.rule_low_bytes / GB:,.0f}"
    return f"{r.rule_low_bytes / GB:,.0f}-{r.rule_high_bytes / GB:,.0f}"


#: causes smaller than this are left out of the narrow table (they print as +0.0)
NARROW_CAUSE_MIN_BYTES = GB // 20


def rules_tables(rows: list[RuleRow], wide: bool = False) -> Table:
    """The rules beside the estimate: 80 columns by default (sizes, short settings with
    their recipe, the largest cause by a short name); ``wide`` adds the model and recipe
    columns and every cause."""
    per_gpu = "H100s x GB" if not wide else "ZeRO-3 on H100 80GB: GPUs x GB each"
    models = "; ".join(sorted({f"{r.size} = {r.model} ({r.params / BILLION:.2f}B)" for r in rows},
                              key=lambda t: float(t.split("B")[0])))
    recipes = "; ".join(recipe_line(p) for p in dict.fromkeys(r.estimate.setup.precision for r in rows))
    table = Table(title="Rules of thumb beside the estimate, GB (10^9 B)" if not wide else
                  "Rules of thumb (Deep Learning 101, 2023) beside the detailed estimate, in GB (10^9 bytes)",
                  caption=f"{models}; batch 1 x seq 512 unless said; the estimate is the step's peak on one "
                          f"CUDA GPU; {recipes}{'' if wide else '; --wide names every cause'}",
                  box=None if not wide else box.HEAVY_HEAD, pad_edge=False)
    columns = [("size", "left"), ("setting", "left"), ("rule", "right"), ("est.", "right"), (per_gpu, "right"),
               ("largest gap" if not wide else "what the rule leaves out (GB)", "left")]
    if wide:
        columns[2:2] = [("recipe", "left")]
        columns.insert(1, ("model", "left"))
    for col, just in columns:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        fits = "-" if r.per_gpu is None else f"{r.per_gpu[0]} x {r.per_gpu[1] / GB:,.1f}"
        if wide:
            causes = "; ".join(f"{c.why} {c.bytes / GB:+,.2f}" for c in r.causes)
            table.add_row(r.size, f"{r.model} ({r.params / BILLION:.2f}B)", r.setting,
                          str(r.estimate.setup.precision), _rule_text(r),
                          f"{r.estimate.total_bytes / GB:,.1f}", fits, causes)
        else:
            big = sorted((c for c in r.causes if abs(c.bytes) >= NARROW_CAUSE_MIN_BYTES), key=lambda c: -abs(c.bytes))
            causes = f"{big[0].name} {big[0].bytes / GB:+,.1f}" if big else ""
            table.add_row(r.size, r.short or r.setting, _rule_text(r), f"{r.estimate.total_bytes / GB:,.1f}",
                          fits, causes)
    return table


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits 1 when the reader of stdout is gone; raise instead, so a table ends a
        closed pipe as every other print does (profiler/cli.py ``main``: quietly)."""
        self.quiet = True
        raise BrokenPipeError


def console(wide: bool = False) -> Console:
    """Where tables and sentences go: the terminal's width (rich reads ``COLUMNS``, else
    the terminal, else 80 columns), tables folding their text columns to fit; ``wide``
    draws every table at its natural width. No markup: a label's ``[cpu]`` stays text."""
    return _Console(width=WIDE_COLUMNS if wide else None, markup=False, highlight=False, emoji=False)


def print_table(table: Table, wide: bool = False) -> None:
    """One table at the terminal's width (``wide``: at its natural width)."""
    console(wide).print(table)


def print_text(text: str, wide: bool = False) -> None:
    """A sentence wrapped at the terminal's width between words (``wide``: one line)."""
    if wide:
        print(text)
    else:
        console().print(text, overflow="fold")
