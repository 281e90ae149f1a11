"""The report explains itself (issue 28): units and a key on every table, where and when
the records were measured under which versions, phases on the CUDA timeline, and a
categories plot whose legend covers no bar, whose tallest bar fits and whose labels read."""
from __future__ import annotations

from pathlib import Path

import pytest

from estimator.categories import TENSOR_CATEGORIES
from profiler.analysis.report import (
    CASES_KEY,
    CATEGORIES_KEY,
    LABEL_PT,
    _plt,
    bars_figure,
    category_key,
    timeline_figure,
    write_report,
)
from profiler.analysis.validate import validate
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "results/cuda/h200/cuda-standard.jsonl"
#: The smallest label the plots may use, in points (110 dpi: 12 px)
MIN_LABEL_PT = 8


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory):
    records = read_records(CUDA)
    folder = tmp_path_factory.mktemp("report")
    write_report(validate(records), records, folder, "cuda")
    return folder


def test_the_page_says_where_when_and_under_which_versions(cuda_report):
    for name in ("summary.md", "report.html"):
        text = (cuda_report / name).read_text(encoding="utf-8")
        for want in ("measured: 2026-11-26", "NVIDIA H200", "host: vm", "torch 2.11.0", "transformers 5.17.0"):
            assert want in text, (name, want)


def test_every_table_has_its_units_and_a_key(cuda_report):
    text = (cuda_report / "summary.md").read_text(encoding="utf-8")
    assert CASES_KEY in text and CATEGORIES_KEY in text and "GiB (2^30 bytes)" in text
    for line in category_key():
        assert f"- {line}" in text


def test_the_category_key_defines_every_tensor_category():
    key = dict(line.split(": ", 1) for line in category_key())
    assert list(key) == [c.value.replace("_", " ") for c in TENSOR_CATEGORIES]
    assert all(len(text) > 10 for text in key.values()), key


def test_the_categories_plot_keeps_bars_clear_of_legend_and_frame():
    fig = bars_figure(validate(read_records(CUDA)))
    try:
        (ax,) = fig.axes
        tallest = max(p.get_y() + p.get_height() for p in ax.patches)
        assert ax.get_ylim()[1] > tallest
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, over no bar
        labels = ax.get_xticklabels() + ax.get_yticklabels() + ax.get_legend().get_texts()
        assert min(t.get_fontsize() for t in labels) >= MIN_LABEL_PT >= LABEL_PT - 1
    finally:
        _plt().close(fig)


def test_the_cuda_timeline_draws_each_phase():
    record = next(r for r in read_records(CUDA) if r.measured.nvml_timeline)
    fig = timeline_figure(record)
    try:
        labels = fig.axes[0].get_legend_handles_labels()[1]
        for phase in ("forward", "backward", "optimizer"):
            assert any(phase in label and not label.startswith("first") for label in labels), labels
            assert any(label.startswith(f"first {phase}") for label in labels), labels
    finally:
        _plt().close(fig)


def test_the_memory_plot_shows_what_allocated_misses_and_each_figures_error():
    from profiler.analysis.report import memory_figure
    v = validate(read_records(CUDA))
    fig = memory_figure(v)
    try:
        top, bottom = fig.axes
        assert len(top.patches) == len(v.rows)  # one bar per case: reserved - allocated
        labels = bottom.get_legend_handles_labels()[1]
        assert labels == ["allocated vs max_memory_allocated", "reserved vs max_memory_reserved",
                          "device total vs NVML (alone)"]
        (nvml,) = [c for c in top.collections if c.get_offsets().shape[0]]
        assert nvml.get_offsets().shape[0] == len([r for r in v.rows if r.nvml_process])
    finally:
        _plt().close(fig)


def test_records_without_reserved_memory_get_no_memory_plot():
    from profiler.analysis.report import memory_figure
    cpu = read_records(ROOT / "results/cpu/cpu-quick.jsonl")
    assert memory_figure(validate(cpu)) is None
