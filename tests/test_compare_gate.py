"""`vramlab compare` fails closed (issue 15, item 4): one test per case, on the committed
cpu-quick records and copies of them changed by hand; exit codes through the CLI."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from profiler.analysis.compare import CompareError, Threshold, compare, parse_points
from profiler.record import check_record

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "cpu" / "cpu-quick.jsonl"


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def _records(objs):
    return [check_record(o, f"line {i}") for i, o in enumerate(objs, start=1)]


def _write(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def _scaled(objs, factor):
    out = copy.deepcopy(objs)
    for o in out:
        o["measured"]["peak_allocated_bytes"] = int(o["measured"]["peak_allocated_bytes"] * factor)
    return out


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "profiler.cli", "compare", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def _fails_cleanly(r, code: int = 2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr


def test_empty_current_records_fail_with_a_sentence(objs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _cli(RECORDS, empty)
    _fails_cleanly(r)
    assert f"{empty} holds no records" in r.stderr
    r = _cli(RECORDS, "/dev/null")  # no file at all: refused before it is read (issue 26)
    _fails_cleanly(r)
    assert "/dev/null is a character device, not a regular file" in r.stderr
    with pytest.raises(CompareError, match="the current records holds no records"):
        compare(_records(objs), [], Threshold.parse("2%"))
    with pytest.raises(CompareError, match="the baseline holds no records"):
        compare([], _records(objs), Threshold.parse("2%"))


def test_missing_current_file_fails_with_a_sentence(tmp_path):
    r = _cli(RECORDS, tmp_path / "absent.jsonl")
    _fails_cleanly(r)
    assert "cannot read records file" in r.stderr and "absent.jsonl" in r.stderr


def test_baseline_cases_missing_from_current_are_listed_and_fail_unless_allowed(objs, tmp_path):
    cur = _write(tmp_path / "cur.jsonl", objs[:3])
    r = _cli(RECORDS, cur)
    _fails_cleanly(r, 1)
    assert "**cases missing**" in r.stdout and "Missing from the current run:" in r.stdout
    missing = r.stdout.split("Missing from the current run:")[1].strip().splitlines()
    assert len(missing) == len(objs) - 3
    assert len(set(missing)) == len(missing)  # cases whose short labels collide are told apart
    allowed = _cli(RECORDS, cur, "--allow-missing")
    assert allowed.returncode == 0 and "no regression" in allowed.stdout and "(allowed)" in allowed.stdout


def test_no_matched_case_fails_even_when_missing_cases_are_allowed(objs, tmp_path):
    other = copy.deepcopy(objs)
    for o in other:
        o["case"]["steps"] = 99  # every case differs from the baseline's
    r = _cli(RECORDS, _write(tmp_path / "other.jsonl", other), "--allow-missing")
    _fails_cleanly(r, 1)
    assert "no case matched" in r.stdout and "0 cases matched" in r.stdout


def test_a_decrease_is_an_improvement_never_a_regression(objs, tmp_path):
    smaller = _scaled(objs, 0.9)
    cmp = compare(_records(objs), _records(smaller), Threshold.parse("2%"))
    assert not cmp.regressed and not cmp.failures()
    assert len(cmp.improvements) == len(objs)  # every peak fell 10 %, past the 2 % threshold
    r = _cli(RECORDS, _write(tmp_path / "smaller.jsonl", smaller), "--threshold", "2%")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no regression" in r.stdout and "Improvements (not failures)" in r.stdout and "-10.00%" in r.stdout
    bigger = _cli(RECORDS, _write(tmp_path / "bigger.jsonl", _scaled(objs, 1.1)))
    _fails_cleanly(bigger, 1)
    assert "**memory regression**" in bigger.stdout and "+10.00%" in bigger.stdout


def test_estimate_error_growth_is_a_separate_opt_in_check(objs, tmp_path):
    smaller = _write(tmp_path / "smaller.jsonl", _scaled(objs, 0.9))  # the estimate is now ~11 % high
    assert _cli(RECORDS, smaller).returncode == 0  # off unless asked for
    r = _cli(RECORDS, smaller, "--error-growth", "1%")
    _fails_cleanly(r, 1)
    assert "**estimate error growth**" in r.stdout and "memory regression" not in r.stdout
    assert "estimate |error|" in r.stdout and "pt |" in r.stdout
    assert _cli(RECORDS, smaller, "--error-growth", "20%").returncode == 0
    cmp = compare(_records(objs), _records(_scaled(objs, 0.9)), Threshold.parse("2%"), error_growth=0.01)
    assert cmp.error_regressions and not cmp.memory_regressions


def test_zero_baselines_are_handled(objs, tmp_path):
    zero = copy.deepcopy(objs)
    for o in zero:
        o["measured"]["peak_allocated_bytes"] = 0
    zero_path = _write(tmp_path / "zero.jsonl", zero)
    r = _cli(zero_path, RECORDS)  # growth from nothing is growth
    _fails_cleanly(r, 1)
    assert "**memory regression**" in r.stdout and "from 0 B" in r.stdout
    same = _cli(zero_path, zero_path, "--threshold", "0%", "--error-growth", "1%")
    assert same.returncode == 0 and "Traceback" not in same.stderr
    for threshold in ("2%", "256MiB", "0%"):
        compare(_records(zero), _records(objs), Threshold.parse(threshold), error_growth=0.01)  # no ZeroDivisionError
        compare(_records(objs), _records(zero), Threshold.parse(threshold), error_growth=0.01)


@pytest.mark.parametrize("side", ["baseline", "current"])
def test_duplicate_case_keys_exit_2_naming_them(objs, tmp_path, side):
    dup = _write(tmp_path / "dup.jsonl", objs + objs[-1:])
    args = (dup, RECORDS) if side == "baseline" else (RECORDS, dup)
    r = _cli(*args)
    _fails_cleanly(r)
    label = _records(objs[-1:])[0].case.label(backend=True)
    assert f"{dup} holds one case more than once" in r.stderr and f"{label} (2 records)" in r.stderr


@pytest.mark.parametrize("flag,value", [("--threshold", "nan%"), ("--threshold", "inf%"), ("--threshold", "-1%"),
                                        ("--threshold", "1e400%"), ("--error-growth", "nan%"),
                                        ("--error-growth", "-0.5%"), ("--error-growth", "inf%")])
def test_thresholds_must_be_finite_and_not_negative(flag, value):
    r = _cli(RECORDS, RECORDS, f"{flag}={value}")
    _fails_cleanly(r)
    assert "must be a finite number >= 0" in r.stderr and value in r.stderr


def test_threshold_values_checked_in_the_api():
    for bad in (float("nan"), float("inf"), -0.01):
        with pytest.raises(CompareError, match="finite number >= 0"):
            Threshold(fraction=bad)
    with pytest.raises(CompareError, match="integer >= 0"):
        Threshold(bytes=-1)
    with pytest.raises(CompareError, match="takes a percentage"):
        parse_points("256MiB")
    with pytest.raises(CompareError, match="too large"):
        Threshold.parse("9" * 400 + "TiB")
    assert Threshold.parse("0%").exceeded(100, 101) and not Threshold.parse("0%").exceeded(100, 100)


def test_a_torn_tail_in_current_is_skipped_with_a_warning(objs, tmp_path):
    torn = tmp_path / "torn.jsonl"
    line = json.dumps(objs[0])
    torn.write_text(RECORDS.read_text() + line[: len(line) // 2])  # every record, then a write cut short
    r = _cli(RECORDS, torn)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{torn}, line {len(objs) + 1}: skipped an unfinished last record" in r.stderr
    assert f"{len(objs)} cases matched" in r.stdout


# --- issue 26, item 1: a missing measurement on either side fails the gate ------------------------

def _without(objs, index: int, key: str | None = None):
    """A copy with record ``index``'s ``measured`` emptied (``key`` None) or lacking ``key``."""
    out = copy.deepcopy(objs)
    if key is None:
        out[index]["measured"] = {}
    else:
        out[index]["measured"].pop(key, None)
    return out


@pytest.mark.parametrize("key", ["peak_allocated_bytes", None], ids=["no peak", "measured {}"])
def test_a_current_ok_record_that_measured_nothing_fails_the_gate(objs, tmp_path, key):
    cur = _write(tmp_path / "cur.jsonl", _without(objs, 2, key))
    r = _cli(RECORDS, cur)
    _fails_cleanly(r, 1)
    label = _records(objs[2:3])[0].case.label(backend=True)
    assert "**missing measurement**" in r.stdout
    (line,) = [x for x in r.stdout.splitlines() if "missing from" in x]  # one case, one metric
    assert line.startswith(f"- {label}") and line.endswith(f": peak allocated missing from {cur}"), line
    cmp = compare(_records(objs), _records(_without(objs, 2, key)), Threshold.parse("2%"))
    assert cmp.failures() == ["missing measurement"] and not cmp.regressed


def test_a_baseline_without_its_peak_cannot_hide_a_tenfold_growth(objs, tmp_path):
    base = _write(tmp_path / "base.jsonl", _without(objs, 0, "peak_allocated_bytes"))
    grown = copy.deepcopy(objs)
    grown[0]["measured"]["peak_allocated_bytes"] *= 10
    r = _cli(base, _write(tmp_path / "cur.jsonl", grown))
    _fails_cleanly(r, 1)
    assert "**missing measurement**" in r.stdout and f"peak allocated missing from {base}" in r.stdout


def test_a_metric_in_the_baseline_absent_from_current_fails(objs, tmp_path):
    with_reserved = copy.deepcopy(objs)
    for o in with_reserved:
        o["measured"]["peak_reserved_bytes"] = o["measured"]["peak_allocated_bytes"]
    base = _write(tmp_path / "base.jsonl", with_reserved)
    r = _cli(base, RECORDS)  # the committed cpu records measure no reserved bytes
    _fails_cleanly(r, 1)
    assert "**missing measurement**" in r.stdout
    assert r.stdout.count(f"peak reserved missing from {RECORDS}") == len(objs)
    assert _cli(RECORDS, RECORDS).returncode == 0  # a metric neither side measures is no failure
