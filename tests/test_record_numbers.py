"""Negative or non-numeric bytes anywhere in a record (per phase, per category, in the
prediction, in free-form objects) are rejected with the line number (issue 15, item 5);
every committed record still loads."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiler.record import RecordError, read_records

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "results" / "cpu" / "cpu-quick.jsonl"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "profiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _set(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node[key]
    node[last] = value
    return obj


BAD_BYTES = [
    ("measured.peak_allocated_bytes", -1, "must not be negative"),
    ("measured.phases.forward.peak_allocated_bytes", -1, "must not be negative"),
    ("measured.phases.backward.start_bytes", "12", "must be an integer number of bytes"),
    ("measured.phases.forward.categories.weights", -4096, "must not be negative"),
    ("measured.phases.forward.categories.activations", 1.5, "must be an integer"),
    ("measured.first_step.forward.peak_allocated_bytes", -1, "must not be negative"),
    ("measured.categories.weights", None, "must be an integer"),
    ("predicted.components.weights", -1, "must not be negative"),
    ("predicted.phases.forward.activations", "lots", "must be an integer"),
    ("predicted.first_step.phases.forward.weights", -1, "must not be negative"),
    ("predicted.first_step.allocated_bytes", "x", "must be an integer number of bytes"),
    ("device.total_memory_bytes", -1, "must not be negative"),
    ("timings.step_s", [float("nan")], "must be a finite number"),
]


@pytest.mark.parametrize("path,value,message", BAD_BYTES, ids=[p for p, _, _ in BAD_BYTES])
def test_negative_or_non_numeric_bytes_are_rejected_with_the_line(tmp_path, path, value, message):
    first, second = [json.loads(line) for line in QUICK.read_text().splitlines()[:2]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(first) + "\n" + json.dumps(_set(second, path, value)) + "\n")
    with pytest.raises(RecordError, match=rf"line 2: {path.replace('.', '[.]')}\S* {message}"):
        read_records(bad)
    r = _cli("validate", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{bad}, line 2: {path}" in r.stderr


def test_every_committed_record_still_loads():
    # measurement records; results/published holds published rows (their own schema, tests/test_published.py)
    files = sorted(f for f in (ROOT / "results").rglob("*.jsonl") if "published" not in f.relative_to(ROOT).parts)
    assert len(files) >= 4
    records = [r for f in files for r in read_records(f)]
    # a difference of two readings may be negative (the first H200 records have two)
    assert any((r.measured.nvml_context_bytes or 0) < 0 for r in records)
