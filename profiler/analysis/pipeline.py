"""The quick loop behind ``vramlab loop``: profile the embedded matrix, calibrate on what
was measured, validate against the simpler predictors, write the report."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from estimator.files import make_folder
from profiler.analysis.calibrate import calibrate, write_calibration
from profiler.analysis.report import write_report
from profiler.analysis.validate import Validation, validate
from profiler.record import read_records
from profiler.sweeps.sweep import sweep

QUICK_MATRIX = Path(__file__).resolve().parents[1] / "data" / "cpu-quick.toml"


def quick_loop(out: Path, backend: str, say: Callable[[str], None]) -> tuple[Validation, dict[str, Path]]:
    """Records, calibration and report under ``out``; returns the validation and the report's files."""
    make_folder(out, "output folder")
    records_path = out / f"{backend}-quick.jsonl"
    say(f"1/3 profiling {QUICK_MATRIX.name} on the {backend} backend -> {records_path}")
    sweep(QUICK_MATRIX, backend, records_path, timeline=True,
          on_case=lambda n, total, r: say(f"  [{n}/{total}] {r.case.label()}: {r.status}"),
          on_skip=lambda n, total, job, sentence: say(f"  [{n}/{total}] {job.case.label()}: skipped: {sentence}"))
    records = read_records(records_path)
    cal_path = out / f"{backend}-quick-calibration.json"
    say(f"2/3 calibrating -> {cal_path}")
    write_calibration(cal_path, calibrate(records, [records_path], f"{backend}-quick"))
    say(f"3/3 validating -> {out / 'report'}")
    result = validate(records)
    return result, write_report(result, records, out / "report", f"vramlab quick loop ({backend})")
