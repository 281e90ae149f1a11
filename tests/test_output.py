"""What a newcomer reads (issue 28): output that fits an 80-column terminal unless
``--wide`` is asked for, and precision recipes defined once (the ``Precision`` enum) and
shown wherever a precision is named: ``--help``, the README, ``estimate``, ``fit``, ``rules``."""
from __future__ import annotations

from pathlib import Path

import pytest

from estimator.setup import Precision
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]

#: The terminal every check below runs in (rich reads COLUMNS; argparse too).
COLUMNS = 80

COMMANDS = [
    ("estimate", "llama-2-7b"),
    ("estimate", "llama-3.1-8b", "--mode", "inference", "--seq", "4096", "--new-tokens", "256", "--gpu", "l40s"),
    ("estimate", "llama-2-70b", "--sharding", "zero3", "--world-size", "16", "--grad-ckpt"),
    ("estimate", "mistral-7b", "--mode", "lora", "--lora-rank", "16", "--lora-targets", "q_proj,v_proj"),
    ("fit", "llama-3.1-8b", "--gpu", "h100-80gb"),
    ("fit", "llama-2-70b", "--memory", "80GiB"),
    ("rules",),
    ("validate", "results/cpu/cpu-quick.jsonl", "results/cpu/cpu-timeline.jsonl"),
    ("validate", "results/cuda/h200/cuda-standard.jsonl", "--calibration", "results/calibration/cuda-h200.json"),
    ("validate", "--published"),
]


def _widest(text: str) -> tuple[int, str]:
    return max(((len(line), line) for line in text.splitlines()), default=(0, ""))


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_output_fits_80_columns(cli, narrow, argv):
    result = cli(*argv)
    assert result.code == 0, result.err
    for stream in (result.out, result.err):
        width, line = _widest(stream)
        assert width <= COLUMNS, f"{width} columns: {line!r}"


@pytest.mark.parametrize("argv", [("validate", "results/cuda/h200/cuda-standard.jsonl"), ("validate", "--published"),
                                  ("rules",)], ids=" ".join)
def test_wide_shows_every_column_unfolded(cli, narrow, argv):
    result = cli(*argv, "--wide")
    assert result.code == 0, result.err
    assert _widest(result.out)[0] > COLUMNS


def test_calibrate_fits_80_columns(cli, narrow, tmp_path):
    for _ in ("wrote", "kept"):
        result = cli("calibrate", "results/cpu/cpu-quick.jsonl", "--out", str(tmp_path / "calibration-of-cpu.json"))
        assert result.code == 0, result.err
        assert _widest(result.out)[0] <= COLUMNS, result.out


def test_profile_tables_fit_80_columns(narrow, capsys):
    from profiler.show import print_records
    print_records(read_records(ROOT / "results/distributed/cpu-fsdp.jsonl")[:2])
    assert _widest(capsys.readouterr().out)[0] <= COLUMNS


@pytest.mark.parametrize("command", ["", "estimate", "fit", "rules", "profile", "sweep", "campaign", "calibrate",
                                     "validate", "compare", "loop"])
def test_help_fits_80_columns(cli, narrow, command):
    result = cli(*([command] if command else []), "--help")
    assert result.code == 0
    assert _widest(result.out)[0] <= COLUMNS, result.out


@pytest.mark.parametrize("command", ["estimate", "fit", "profile"])
def test_help_defines_every_precision_recipe(cli, narrow, command):
    text = " ".join(cli(command, "--help").out.split())
    for p in Precision:
        assert f"{p.value} {p.recipe}. Comes from: {p.comes_from}." in text, p


def test_readme_shows_the_recipes_as_the_enum_defines_them():
    from estimator.cli_args import recipes_markdown
    assert recipes_markdown() in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("precision", [p.value for p in Precision])
def test_estimate_names_the_recipe_it_assumes(cli, narrow, precision):
    out = " ".join(cli("estimate", "gpt2", "--precision", precision).out.split())
    assert f"precision {precision} = {Precision(precision).recipe}" in out


def test_fit_shows_its_recipe_and_the_others(cli, narrow):
    """Full fine-tuning of Llama-3.1-8B on one H100: safe in pure bf16, in no amp or mixed recipe."""
    out = cli("fit", "llama-3.1-8b", "--gpu", "h100-80gb").out
    flat = " ".join(out.split())
    assert f"assumes precision bf16 = {Precision.BF16.recipe}" in flat
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in {p.value for p in Precision}}
    assert set(rows) == {p.value for p in Precision}
    assert rows["bf16"][-2] == "safe" and int(rows["bf16"][-1]) > 0, rows["bf16"]
    for recipe in ("amp-bf16", "mixed-bf16"):  # fp32 weights and AdamW state: > 16 bytes/param
        assert rows[recipe][-2:] == ["no", "0"], rows[recipe]


def test_rules_name_the_recipe_of_every_row(cli, narrow):
    flat = " ".join(cli("rules").out.split())
    assert "train mixed-bf16 12X" in flat and "inference bf16 2X" in flat
    for p in (Precision.FP32, Precision.BF16, Precision.MIXED_BF16):
        assert f"precision {p} = {p.recipe}" in flat
