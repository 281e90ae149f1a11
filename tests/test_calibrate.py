"""Calibration, validation, reports and compare, on synthetic and committed records."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from estimator.calibration import load_calibration
from estimator.estimate import estimate
from estimator.modelspec import load_model
from estimator.overheads import Overheads
from estimator.setup import Setup
from profiler.analysis.calibrate import calibrate, fit, points, summary
from profiler.analysis.compare import Threshold, compare
from profiler.analysis.validate import validate
from profiler.record import Case, Measured, Prediction, Record, Status, append_record, check_record, read_records

ROOT = Path(__file__).resolve().parents[1]
RECOVERY_TOLERANCE = 1e-4  # relative: factors fitted from noise-free synthetic records

TRUE_FACTORS = {"llama|eager|half": 1.15, "gpt2|sdpa|fp32": 0.9}
TRUE_CONSTANT = 300 * 2**20
CASES = [("smollm2-135m", dict(precision="bf16", attn="eager", batch=b, seq=s))
         for b, s in ((4, 512), (8, 1024), (2, 2048))] + \
        [("gpt2", dict(precision="fp32", attn="sdpa", batch=b, seq=s)) for b, s in ((4, 512), (8, 1024), (16, 512))]


def synthetic_record(model: str, setup: Setup, overheads: Overheads) -> Record:
    """A record whose 'measurement' is the estimate under known factors."""
    spec = load_model(model)
    truth = estimate(spec, setup, overheads=overheads)
    case = Case(model=model, config_hash=spec.config_hash, setup=setup.to_dict(), steps=1, backend="sim")
    measured = Measured(peak_allocated_bytes=truth.allocated_bytes, peak_phase=truth.peak_phase.value,
                        categories={k.value: v for k, v in truth.components.items()})
    return Record(case=case, case_key=case.key, backend="sim", status=Status.OK, measured=measured,
                  predicted=Prediction(**estimate(spec, setup).to_dict()))


@pytest.fixture(scope="module")
def synthetic():
    truth = Overheads(activation_factors=TRUE_FACTORS, constant_bytes=TRUE_CONSTANT)
    return [synthetic_record(m, Setup(**kw), truth) for m, kw in CASES]


def test_calibration_recovers_known_factors(synthetic):
    factors, constant = fit(points(synthetic))
    assert set(factors) == set(TRUE_FACTORS)
    for key, k in TRUE_FACTORS.items():
        assert factors[key] == pytest.approx(k, rel=RECOVERY_TOLERANCE)
    assert constant == pytest.approx(TRUE_CONSTANT, rel=1e-3)


def test_calibration_file_roundtrip_and_loo(synthetic, tmp_path):
    src = tmp_path / "r.jsonl"
    for r in synthetic:
        append_record(src, r)
    result = calibrate(read_records(src), [src], "synthetic")
    assert result["fit"]["summary"]["loo"]["max"] < 1e-3  # noise-free: leave-one-out is exact too
    assert result["fit"]["summary"]["uncalibrated"]["max"] > 0.01  # and the defaults were off
    assert result["records"][0]["sha256"] and result["cases_used"] == len(CASES)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(result))
    overheads = load_calibration(path)
    assert overheads.activation_factors["gpt2|sdpa|fp32"] == pytest.approx(0.9, rel=RECOVERY_TOLERANCE)
    assert "synthetic" in overheads.source
    model, kw = CASES[0]
    calibrated = estimate(load_model(model), Setup(**kw), overheads=overheads)
    assert calibrated.allocated_bytes == pytest.approx(synthetic[0].measured.peak_allocated_bytes, rel=1e-3)
    assert calibrated.overheads_source == overheads.source


def test_bad_calibration_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(path)
    path.write_text('{"schema": 1, "overheads": {}}')
    with pytest.raises(ValueError, match="malformed"):
        load_calibration(path)


def test_summary_percentiles():
    s = summary([0.01, -0.02, 0.03, 0.04, -0.10])
    assert s == {"median": 0.03, "p95": 0.10, "max": 0.10}


def test_validate_json_has_every_predictor(synthetic):
    v = validate(synthetic).to_dict()
    assert v["cases"] == len(CASES)
    for name in ("uncalibrated", "calibrated_loo", "rules_of_thumb", "accelerate", "korthikanti"):
        assert set(v[name]) == {"median", "p95", "max"}
    assert v["calibrated_loo"]["max"] < v["uncalibrated"]["max"]


def test_report_files(synthetic, tmp_path):
    from profiler.analysis.report import write_report
    written = write_report(validate(synthetic), synthetic, tmp_path / "rep", "t")
    for key in ("scatter", "bars", "markdown", "html"):
        assert written[key].exists() and written[key].stat().st_size > 500
    assert written["scatter"].read_bytes()[:4] == b"\x89PNG"
    html = written["html"].read_text()
    assert "data:image/png;base64," in html and "korthikanti" in html


def _scaled(records, factor):
    out = []
    for r in records:
        obj = r.to_json()
        obj["measured"]["peak_allocated_bytes"] = int(obj["measured"]["peak_allocated_bytes"] * factor)
        out.append(check_record(obj, "scaled"))
    return out


def test_compare_flags_increase_over_threshold(synthetic):
    assert not compare(synthetic, synthetic, Threshold.parse("2%")).regressed
    assert compare(synthetic, _scaled(synthetic, 1.05), Threshold.parse("2%")).regressed
    assert not compare(synthetic, _scaled(synthetic, 1.01), Threshold.parse("2%")).regressed
    assert not compare(synthetic, _scaled(synthetic, 1.05), Threshold.parse("1TiB")).regressed
    one_side = compare(synthetic[:2], synthetic[1:], Threshold.parse("2%"))
    assert len(one_side.only_baseline) == 1 and len(one_side.only_current) == len(CASES) - 2


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "profiler.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_compare_cli_exit_codes(synthetic, tmp_path):
    base, cur, bad = tmp_path / "b.jsonl", tmp_path / "c.jsonl", tmp_path / "bad.jsonl"
    for r in synthetic:
        append_record(base, r)
    for r in _scaled(synthetic, 1.05):
        append_record(cur, r)
    same = _cli("compare", str(base), str(base))
    assert same.returncode == 0 and "no regression" in same.stdout
    worse = _cli("compare", str(base), str(cur), "--threshold", "2%")
    assert worse.returncode == 1 and "memory regression" in worse.stdout and "+5.00%" in worse.stdout
    bad.write_text(base.read_text() + "{oops\n")
    broken = _cli("compare", str(base), str(bad))
    assert broken.returncode == 2 and f"line {len(CASES) + 1}" in broken.stderr and "Traceback" not in broken.stderr
    assert _cli("compare", str(base), str(cur), "--threshold", "2 parsecs").returncode == 2


def test_committed_cpu_records_validate_within_target():
    """Issue target: calibrated leave-one-out max |error| <= 2% on the cpu-quick matrix."""
    records = read_records(ROOT / "results" / "cpu" / "cpu-quick.jsonl")
    v = validate(records)
    assert v.summaries["calibrated_loo"]["max"] <= 0.02


#: Every tensor category at the measured peak within this share of the peak (issue: 1 %)
CATEGORY_TOLERANCE = 0.01


@pytest.mark.parametrize("path", ["results/cpu/cpu-quick.jsonl", "results/sim/sim-large.jsonl"])
def test_committed_records_agree_per_category(path):
    v = validate(read_records(ROOT / path))
    worst = {r.label: r.worst_category_error for r in v.rows}
    assert max(worst.values()) <= CATEGORY_TOLERANCE, worst


@pytest.mark.parametrize("model,kw", [
    ("smollm2-135m", dict(precision="fp32", batch=2, seq=512, optimizer="sgd")),   # logits and activations
    ("gpt2", dict(mode="lora", precision="fp32", batch=2, seq=512, lora_targets=("c_attn",))),
    ("opt-125m", dict(precision="fp32", batch=2, seq=512, grad_ckpt=True, attn="eager", optimizer="sgd")),
    # fp32 copies of the gradients at the optimizer step: gradients on both sides (the H200 campaign
    # had them as temporaries in the measurement, 16.7 % of the peak)
    ("smollm2-135m", dict(precision="mixed-bf16", batch=2, seq=256)),
])
@pytest.mark.slow
def test_realistic_cpu_steps_agree_per_category(model, kw):
    from profiler.measure.run import run_case
    record = run_case(model, Setup(**kw), "cpu", steps=1)
    assert record.ok, record.message
    (row,) = validate([record]).rows
    assert row.worst_category_error <= CATEGORY_TOLERANCE, row.category_errors()
