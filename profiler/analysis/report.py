"""Pictures and pages from a Validation: PNG plots, one self-contained HTML report and a
markdown summary (matplotlib, Agg backend; no display needed)."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from estimator.categories import TENSOR_CATEGORIES, Category
from estimator.files import make_folder, write_atomic
from estimator.units import GiB
from profiler.analysis.validate import Validation, summary_label
from profiler.record import Record

BAND = 0.05  # the +-5% band drawn around the diagonal
MAX_BARS = 24  # cases shown in the stacked-bar chart (more do not leave a bar readable)
BAR_HEADROOM = 1.06  # the bar chart's top over its tallest bar, so no bar touches the frame
LABEL_PT = 9  # tick, legend and axis labels (at 110 dpi: about 14 px)
PREDICTORS = ("uncalibrated", "calibrated", "calibrated_loo", "first_step", "rules_of_thumb", "accelerate",
              "korthikanti", "reserved", "nvml")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """The figure as a PNG, replacing ``path`` whole (:func:`estimator.files.write_atomic`)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_atomic(path, png.getvalue(), "plot")


def scatter(v: Validation, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    meas = [r.measured / GiB for r in v.rows]
    hi = max(max(meas), max(r.uncalibrated / GiB for r in v.rows)) * 1.1
    ax.plot([0, hi], [0, hi], color="black", lw=1)
    ax.fill_between([0, hi], [0, hi * (1 - BAND)], [0, hi * (1 + BAND)], color="tab:green", alpha=0.15,
                    label=f"+-{BAND:.0%}")
    ax.scatter(meas, [r.uncalibrated / GiB for r in v.rows], label="vramlab (uncalibrated)", s=18)
    loo = [r.measured * (1 + r.loo_error) / GiB for r in v.rows]
    ax.scatter(meas, loo, label="vramlab (calibrated, leave-one-out)", s=12, marker="x")
    for name, marker in (("rules_of_thumb", "^"), ("accelerate", "s")):
        pts = [(r.measured / GiB, r.simple[name] / GiB) for r in v.rows if name in r.simple]
        if pts:
            ax.scatter(*zip(*pts), label=name.replace("_", " "), s=10, marker=marker, alpha=0.6)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured peak (GiB)")
    ax.set_ylabel("predicted peak (GiB)")
    ax.set_title(f"predicted vs measured, {len(v.rows)} cases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def stacked_bars(v: Validation, path: Path) -> Path:
    fig = bars_figure(v)
    _save(fig, path)
    _plt().close(fig)
    return path


def bars_figure(v: Validation):
    """Per case, the estimate's categories (plain) beside the measurement's (hatched) at
    the measured peak phase: the legend outside the axes, room above the tallest bar,
    labels at a readable size."""
    plt = _plt()
    from matplotlib.patches import Patch
    rows = v.rows[:MAX_BARS]
    cats = [c.value for c in Category if c not in (Category.CONTEXT, Category.ALLOCATOR)]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(rows)) + 2.5, 6.5))
    width = 0.4
    colors = plt.get_cmap("tab10")
    top = 0.0
    for side, (attr, offset, hatch) in enumerate((("categories_predicted", -width / 2, ""),
                                                  ("categories_measured", width / 2, "//"))):
        bottoms = [0.0] * len(rows)
        for ci, cat in enumerate(cats):
            vals = [getattr(r, attr).get(cat, 0) / GiB for r in rows]
            ax.bar([i + offset for i in range(len(rows))], vals, width, bottom=bottoms, color=colors(ci),
                   hatch=hatch, label=cat.replace("_", " ") if side == 0 else None, edgecolor="white",
                   linewidth=0.3)
            bottoms = [b + x for b, x in zip(bottoms, vals)]
        top = max([top, *bottoms])
    ax.set_ylim(0, top * BAR_HEADROOM or 1)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.label for r in rows], rotation=60, ha="right", fontsize=LABEL_PT)
    ax.tick_params(axis="y", labelsize=LABEL_PT)
    ax.set_ylabel("GiB (2^30 bytes) at the measured peak phase", fontsize=LABEL_PT + 1)
    shown = f"the first {len(rows)} of {len(v.rows)} cases" if len(rows) < len(v.rows) else f"{len(rows)} cases"
    ax.set_title(f"tensor bytes per category, {shown}", fontsize=LABEL_PT + 2)
    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="lightgray", edgecolor="white", label="estimate (left, plain)"),
                Patch(facecolor="lightgray", edgecolor="white", hatch="//", label="measured (right, hatched)")]
    ax.legend(handles=handles, fontsize=LABEL_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def memory_figure(v: Validation):
    """What decides out of memory, per case (None where no record has reserved memory):
    above, what the measurement held beyond ``max_memory_allocated``: the caching
    allocator's cache (``max_memory_reserved`` - allocated) and, for the cases that ran
    alone, NVML's device peak over the idle baseline - allocated (the cache, the CUDA
    context, cuBLAS workspaces, lazily loaded modules); below, the estimate's error on each
    of the three figures, with the 1 % and 3 % bands. Cases sorted by measured allocated."""
    rows = sorted((r for r in v.rows if r.reserved), key=lambda r: r.measured)
    if not rows:
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.12 * len(rows)) + 2.5, 8.0), sharex=True)
    x = list(range(len(rows)))
    top.bar(x, [(r.reserved - r.measured) / GiB for r in rows], 0.8, color="tab:orange",
            label="max_memory_reserved - max_memory_allocated")
    alone = [(i, (r.nvml_process - r.measured) / GiB) for i, r in enumerate(rows) if r.nvml_process]
    if alone:
        top.scatter(*zip(*alone), color="tab:red", marker="s", s=16, zorder=3,
                    label="NVML device peak - max_memory_allocated (cases that ran alone)")
    top.set_ylabel("GiB (2^30 bytes) beyond the tensors", fontsize=LABEL_PT + 1)
    top.set_title(f"what max_memory_allocated does not count, {len(rows)} cases (sorted by allocated)",
                  fontsize=LABEL_PT + 2)
    top.legend(fontsize=LABEL_PT, loc="upper left")
    for band, alpha in ((0.03, 0.08), (0.01, 0.15)):
        bottom.axhspan(-100 * band, 100 * band, color="tab:green", alpha=alpha, lw=0)
    series = (("allocated vs max_memory_allocated", "o", lambda r: r.error(r.uncalibrated)),
              ("reserved vs max_memory_reserved", "^",
               lambda r: None if not r.predicted_reserved else (r.predicted_reserved - r.reserved) / r.reserved),
              ("device total vs NVML (alone)", "s", lambda r: None if not (r.nvml_process and r.predicted_total)
               else (r.predicted_total - r.nvml_process) / r.nvml_process))
    for label, marker, err in series:
        pts = [(i, 100 * e) for i, r in enumerate(rows) if (e := err(r)) is not None]
        if pts:
            bottom.scatter(*zip(*pts), marker=marker, s=16, label=label)
    bottom.axhline(0, color="black", lw=0.8)
    bottom.set_ylabel("estimate error, % of the measured figure", fontsize=LABEL_PT + 1)
    bottom.set_xticks(x)
    bottom.set_xticklabels([r.label for r in rows], rotation=90, fontsize=max(LABEL_PT - 3, 5))
    bottom.legend(fontsize=LABEL_PT, loc="upper right")
    for ax in (top, bottom):
        ax.tick_params(axis="y", labelsize=LABEL_PT)
        ax.set_xlim(-0.6, len(rows) - 0.4)
    fig.tight_layout()
    return fig


def memory_plot(v: Validation, path: Path) -> Path | None:
    fig = memory_figure(v)
    if fig is None:
        return None
    _save(fig, path)
    _plt().close(fig)
    return path


#: phase -> colour of its band in the timeline plot
PHASE_COLOURS = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green",
                 "zero_grad": "tab:gray", "prefill": "tab:purple", "decode": "tab:pink", "step": "tab:olive"}


def _nvml_phase_levels(m) -> list[tuple[str, float, str]]:
    """(phases, GiB, line style) where NVML should sit at each phase's peak: the caching
    allocator's ``max_memory_reserved`` of the phase plus the CUDA context and the device's
    use before the run (``nvml_context_bytes`` is NVML used - idle - reserved). Phases whose
    levels agree within PHASE_LEVEL_MERGE share a line."""
    base = (m.nvml_idle_used_bytes or 0) + (m.nvml_context_bytes or 0)
    levels: list[tuple[list[str], float, str]] = []
    for prefix, phases, style in (("", m.phases, "--"), ("first ", m.first_step or {}, ":")):
        for name, pm in phases.items():
            if not pm.peak_reserved_bytes:
                continue
            gib = (base + pm.peak_reserved_bytes) / GiB
            same = [lv for lv in levels if lv[2] == style and abs(lv[1] - gib) <= PHASE_LEVEL_MERGE * gib]
            if same:
                same[0][0].append(name)
            else:
                levels.append(([f"{prefix}{name}"], gib, style))
    return [(", ".join(names), gib, style) for names, gib, style in levels]


#: NVML phase levels closer than this share of each other are drawn as one line
PHASE_LEVEL_MERGE = 0.01


def timeline(records: Sequence[Record], path: Path) -> Path | None:
    """The timeline of the first record with one (:func:`timeline_figure`), or None."""
    for r in records:
        if r.measured.timeline or r.measured.nvml_timeline:
            fig = timeline_figure(r)
            _save(fig, path)
            _plt().close(fig)
            return path
    return None


def timeline_figure(r: Record):
    """Live tensor bytes over a run, phases shaded and steps marked (the tracker's
    timeline), else NVML's device memory over seconds (cuda) with each phase's peak level
    drawn across it."""
    m = r.measured
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    if m.timeline:
        xs, ys = zip(*m.timeline)
        ax.plot(xs, [y / GiB for y in ys], lw=1, color="black")
        starts = []
        for name, first, last in m.timeline_phases or []:
            label = name if name not in {s[0] for s in starts} else None
            ax.axvspan(first, max(last, first + 1), color=PHASE_COLOURS.get(name, "tab:cyan"), alpha=0.2,
                       lw=0, label=label)
            if name in ("forward", "prefill", "step"):
                starts.append((name, first))
            elif label:
                starts.append((name, None))
        ticks = [first for _, first in starts if first is not None]
        if ticks:
            ax.set_xticks(ticks, [f"step {i}" for i in range(1, len(ticks) + 1)])
        ax.set_xlabel("tensor allocations of the measured steps (the warm-up step before them)",
                      fontsize=LABEL_PT)
        ax.set_ylabel("live tensor GiB (2^30 B)", fontsize=LABEL_PT)
    else:
        xs, ys = zip(*m.nvml_timeline)
        ax.plot(xs, [y / GiB for y in ys], lw=1, color="black", label="NVML device used")
        for i, (names, gib, style) in enumerate(_nvml_phase_levels(m)):
            ax.axhline(gib, ls=style, lw=0.8, color=plt.get_cmap("tab10")(i % 10), label=f"{names} peak")
        ax.set_xlabel("seconds from the warm-up step's start (the model built before)", fontsize=LABEL_PT)
        ax.set_ylabel("NVML device used GiB (2^30 B)", fontsize=LABEL_PT)
        ax.text(0.0, -0.2, "phase peaks: max_memory_reserved + CUDA context + the device's use before the "
                "run; dashed: steady state, dotted: first step", transform=ax.transAxes, fontsize=LABEL_PT - 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=LABEL_PT - 1, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.tick_params(labelsize=LABEL_PT)
    ax.set_title(f"timeline: {r.label} ({r.backend})", fontsize=LABEL_PT + 1)
    fig.tight_layout()
    return fig


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}%"


def summary_table_md(v: Validation) -> str:
    lines = ["| predictor | median abs error | p95 | max |", "|---|---|---|---|"]
    for name in PREDICTORS:
        s = v.summaries.get(name)
        if s:
            lines.append(f"| {summary_label(name)} | {100 * s['median']:.2f}% | {100 * s['p95']:.2f}% | "
                         f"{100 * s['max']:.2f}% |")
    return "\n".join(lines)


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / GiB:.2f}"


def _ratio_err(predicted: int | None, measured: int | None) -> str:
    return "-" if not predicted or not measured else f"{100 * (predicted - measured) / measured:+.2f}%"


def cases_table_md(v: Validation) -> str:
    names = ["rules_of_thumb", "accelerate", "korthikanti"]
    gpu = any(r.reserved for r in v.rows)
    extra = " reserved GiB | vramlab reserved | NVML GiB | vramlab NVML |" if gpu else ""
    head = ("| case | measured GiB | vramlab | calibrated LOO | " + " | ".join(n.replace("_", " ") for n in names)
            + " |" + extra)
    lines = [head, "|" + "---|" * (4 + len(names) + (4 if gpu else 0))]
    for r in v.rows:
        simple = " | ".join(_pct(r.error(r.simple.get(n))) for n in names)
        line = (f"| {r.label} | {r.measured / GiB:.2f} | {_pct(r.error(r.uncalibrated))} | "
                f"{_pct(r.loo_error)} | {simple} |")
        if gpu:
            line += (f" {_gib(r.reserved)} | {_ratio_err(r.predicted_reserved, r.reserved)} | "
                     f"{_gib(r.nvml)} | {_ratio_err(r.predicted_total, r.nvml_process)} |")
        lines.append(line)
    return "\n".join(lines)


def categories_table_md(v: Validation) -> str:
    """Per case, each tensor category at the measured peak phase: measured GiB and the
    estimate's difference as a share of the peak; the worst category last."""
    cats = [c.value for c in TENSOR_CATEGORIES]
    lines = ["| case | " + " | ".join(c.replace("_", " ") for c in cats) + " | worst |",
             "|" + "---|" * (len(cats) + 2)]
    for r in v.rows:
        errors = r.category_errors()
        cells = [f"{r.categories_measured.get(c, 0) / GiB:.2f} ({100 * errors[c]:+.1f}%)" for c in cats]
        lines.append(f"| {r.label} | " + " | ".join(cells) + f" | {100 * r.worst_category_error:.2f}% |")
    return "\n".join(lines)


#: What the per-case table's columns are (the report prints it above the table).
CASES_KEY = ("measured GiB: the measured peak of live tensor bytes (`max_memory_allocated` on cuda), in GiB "
             "(2^30 bytes). Every other column: (predicted - measured) / measured peak, in percent; vramlab: "
             "uncalibrated; calibrated LOO: calibrated on every other case (leave-one-out); rules of thumb, "
             "accelerate, korthikanti: the simpler predictors.")
CATEGORIES_KEY = ("Each cell: the category's measured GiB (2^30 bytes) at the case's measured peak phase, then in "
                  "brackets the estimate minus the measurement as a share of the measured peak; worst: the largest "
                  "such share, in absolute value.")


def category_key() -> list[str]:
    """``name: definition`` of every tensor category, from the documented members of
    ``estimator.categories.Category`` (their attribute docstrings: the one definition)."""
    import ast
    import inspect

    from estimator import categories
    tree = ast.parse(inspect.getsource(categories))
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Category"]
    docs = {}
    for node, after in zip(cls.body, cls.body[1:]):
        if isinstance(node, ast.Assign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.targets[0].id] = " ".join(str(after.value.value).split())
    return [f"{c.value.replace('_', ' ')}: {docs.get(c.name, '')}" for c in TENSOR_CATEGORIES]


def provenance(records: Sequence[Record]) -> list[str]:
    """Where and when the records were measured, under which versions: one line each, as
    the records say (never the time the report was made, so a report is reproducible)."""
    def counted(values) -> str:
        counts: dict[str, int] = {}
        for value in values:
            counts[value] = counts.get(value, 0) + 1
        return ", ".join(f"{k} ({n})" if len(counts) > 1 else k for k, n in sorted(counts.items()))
    dates = sorted(r.created for r in records if r.created)
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "not recorded"
    versions: dict[str, list[str]] = {}
    for r in records:
        for lib, version in sorted((r.versions or {}).items()):
            versions.setdefault(lib, []).append(version)
    return [f"measured: {when} (UTC)",
            f"backend: {counted(r.backend for r in records)}; device: "
            f"{counted(str((r.device or {}).get('name') or r.backend) for r in records)}",
            f"host: {counted(r.host or 'not recorded' for r in records)}",
            "versions: " + "; ".join(f"{lib} {counted(vs)}" for lib, vs in versions.items())]


def write_report(v: Validation, records: Sequence[Record], folder: Path, title: str) -> dict[str, Path]:
    make_folder(folder, "report folder")
    out = {"scatter": scatter(v, folder / "scatter.png"), "bars": stacked_bars(v, folder / "categories.png")}
    tl = timeline(records, folder / "timeline.png")
    if tl:
        out["timeline"] = tl
    mem = memory_plot(v, folder / "memory.png")
    if mem:
        out["memory"] = mem
    md = [f"# {title}", "", f"{len(v.rows)} cases; errors are (predicted - measured) / measured peak "
          "allocated bytes.", ""] + [f"- {line}" for line in provenance(records)] + [""]
    if v.calibration_source:
        md += [f"Calibration: {v.calibration_source}", ""]
    md += [summary_table_md(v), "", "![predicted vs measured](scatter.png)", "",
           "![categories](categories.png)", ""]
    if tl:
        md += ["![timeline](timeline.png)", ""]
    if mem:
        md += ["![allocated, reserved and NVML per case](memory.png)", ""]
    md += ["## Per case", "", CASES_KEY, "", cases_table_md(v), "",
           "## Per category at the measured peak: measured GiB (estimate - measured, share of the peak)", "",
           CATEGORIES_KEY, ""] + [f"- {line}" for line in category_key()] + ["", categories_table_md(v), ""]
    out["markdown"] = folder / "summary.md"
    write_atomic(out["markdown"], "\n".join(md), "report summary")
    out["html"] = folder / "report.html"
    write_atomic(out["html"], _html(v, records, title, [p for k, p in out.items() if str(p).endswith(".png")]),
                 "report")
    return out


def _md_table_to_html(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html(v: Validation, records: Sequence[Record], title: str, images: list[Path]) -> str:
    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in images)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}"
             "p.key,ul.key{font-size:13px;color:#333}")
    items = lambda lines: "".join(f"<li>{html.escape(line)}</li>" for line in lines)  # noqa: E731
    calibration = f"<p>Calibration: {html.escape(v.calibration_source)}</p>" if v.calibration_source else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(v.rows)} cases; errors are (predicted - measured) / measured peak allocated bytes.</p>"
            f"<ul class='key'>{items(provenance(records))}</ul>{calibration}"
            f"{_md_table_to_html(summary_table_md(v))}{imgs}<h2>Per case</h2>"
            f"<p class='key'>{html.escape(CASES_KEY)}</p>"
            f"{_md_table_to_html(cases_table_md(v))}<h2>Per category at the measured peak</h2>"
            f"<p class='key'>{html.escape(CATEGORIES_KEY)}</p><ul class='key'>{items(category_key())}</ul>"
            f"{_md_table_to_html(categories_table_md(v))}</body></html>")
