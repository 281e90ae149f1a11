"""Pictures and pages from a Validation: PNG plots, one self-contained HTML report and a
markdown summary (matplotlib, Agg backend; no display needed)."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from estimator.categories import TENSOR_CATEGORIES, Category
from estimator.files import write_atomic
from estimator.units import GiB
from profiler.analysis.validate import Validation, summary_label
from profiler.record import Record

BAND = 0.05  # the +-5% band drawn around the diagonal
MAX_BARS = 16  # cases shown in the stacked-bar chart
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
    plt = _plt()
    rows = v.rows[:MAX_BARS]
    cats = [c.value for c in Category if c not in (Category.CONTEXT, Category.ALLOCATOR)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 5))
    width = 0.4
    colors = plt.get_cmap("tab10")
    for side, (attr, offset, hatch) in enumerate((("categories_predicted", -width / 2, ""),
                                                  ("categories_measured", width / 2, "//"))):
        bottoms = [0.0] * len(rows)
        for ci, cat in enumerate(cats):
            vals = [getattr(r, attr).get(cat, 0) / GiB for r in rows]
            ax.bar([i + offset for i in range(len(rows))], vals, width, bottom=bottoms, color=colors(ci),
                   hatch=hatch, label=cat if side == 0 else None, edgecolor="white", linewidth=0.3)
            bottoms = [b + x for b, x in zip(bottoms, vals)]
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.label for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GiB at the peak phase")
    ax.set_title("per category: left predicted, right (hatched) measured")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


#: phase -> colour of its band in the timeline plot
PHASE_COLOURS = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green",
                 "zero_grad": "tab:gray", "prefill": "tab:purple", "decode": "tab:pink", "step": "tab:olive"}


def timeline(records: Sequence[Record], path: Path) -> Path | None:
    """Live tensor bytes over a run, phases shaded and steps marked (the tracker's timeline of
    the first record with one), else NVML's device memory over seconds (cuda)."""
    for r in records:
        m = r.measured
        if not (m.timeline or m.nvml_timeline):
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, 3.5))
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
                ax.legend(fontsize=7, loc="upper left", ncol=4)
            ax.set_xlabel("measured steps (the warm-up step before them)")
            ax.set_ylabel("live tensor GiB")
        else:
            xs, ys = zip(*m.nvml_timeline)
            ax.plot(xs, [y / GiB for y in ys], lw=1)
            ax.set_xlabel("seconds")
            ax.set_ylabel("NVML device used GiB")
        ax.set_title(f"timeline: {r.label} ({r.backend})")
        fig.tight_layout()
        _save(fig, path)
        plt.close(fig)
        return path
    return None


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


def write_report(v: Validation, records: Sequence[Record], folder: Path, title: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {"scatter": scatter(v, folder / "scatter.png"), "bars": stacked_bars(v, folder / "categories.png")}
    tl = timeline(records, folder / "timeline.png")
    if tl:
        out["timeline"] = tl
    md = [f"# {title}", "", f"{len(v.rows)} cases; errors are (predicted - measured) / measured peak "
          "allocated bytes.", ""]
    if v.calibration_source:
        md += [f"Calibration: {v.calibration_source}", ""]
    md += [summary_table_md(v), "", "![predicted vs measured](scatter.png)", "",
           "![categories](categories.png)", ""]
    if tl:
        md += ["![timeline](timeline.png)", ""]
    md += ["## Per case", "", cases_table_md(v), "",
           "## Per category at the measured peak: measured GiB (estimate - measured, share of the peak)", "",
           categories_table_md(v), ""]
    out["markdown"] = folder / "summary.md"
    write_atomic(out["markdown"], "\n".join(md), "report summary")
    out["html"] = folder / "report.html"
    write_atomic(out["html"], _html(v, title, [p for k, p in out.items() if str(p).endswith(".png")]), "report")
    return out


def _md_table_to_html(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _html(v: Validation, title: str, images: list[Path]) -> str:
    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in images)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{len(v.rows)} cases; errors are (predicted - measured) / measured peak allocated bytes.</p>"
            f"{_md_table_to_html(summary_table_md(v))}{imgs}<h2>Per case</h2>"
            f"{_md_table_to_html(cases_table_md(v))}<h2>Per category at the measured peak</h2>"
            f"{_md_table_to_html(categories_table_md(v))}</body></html>")
