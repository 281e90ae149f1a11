"""The ``vram_limit`` pytest plugin, run inside pytester (pytest-memray's way of testing).

Every inner run loads the plugin by module name, with entry-point plugins off and the
``vramlab`` one blocked, so these tests mean the same with and without the package's
``pytest11`` entry point installed (pluggy refuses one module registered under two names). The CPU backend is
forced: its counts are exact (live tensor-storage bytes), on any host.
"""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

# Imported before any inline pytester run: pytester removes the modules a run imported
# when it ends, and importing torch a second time in one process crashes it.
import torch  # noqa: F401

import profiler.measure.tracker  # noqa: F401
from profiler.integrations.pytest_plugin import (
    VALID_UNITS,
    Tolerance,
    VramResult,
    load_baseline,
    parse_tolerance,
    summary_lines,
)

pytest_plugins = ["pytester"]

# This module imports the plugin first, so pytest cannot assert-rewrite it: say nothing of that.
PLUGIN = ("-p", "no:vramlab", "-p", "profiler.integrations.pytest_plugin",
          "-W", "ignore::pytest.PytestAssertRewriteWarning")
CPU = ("--vram-backend", "cpu")
N = 1_000_000  # bytes of one torch.uint8 tensor of N elements: its storage's nbytes()
USAGE_ERROR = int(pytest.ExitCode.USAGE_ERROR)  # 4


@pytest.fixture(autouse=True)
def _no_autoloaded_plugins(monkeypatch):
    """Inner runs load no entry-point plugins (hypothesis' summary alone costs 2 s a run)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def _run(pytester: pytest.Pytester, *args: str):
    return pytester.runpytest(*PLUGIN, *CPU, *args)


ALLOCATING_TESTS = f"""
import pytest
import torch

N = {N}

@pytest.mark.vram_limit(N)
def test_at_limit():
    keep = torch.empty(N, dtype=torch.uint8)

@pytest.mark.vram_limit("1MB")  # 10**6 bytes: the same limit in SI units
def test_at_limit_in_units():
    keep = torch.empty(N, dtype=torch.uint8)

@pytest.mark.vram_limit(N - 1)
def test_one_byte_over():
    keep = torch.empty(N, dtype=torch.uint8)

@pytest.mark.vram_limit(N)
def test_peak_not_total():
    a = torch.empty(N, dtype=torch.uint8)
    del a
    b = torch.empty(N, dtype=torch.uint8)  # reuses nothing it counts: peak N, total 2N

@pytest.mark.vram_limit(2 * N - 1)
def test_two_alive():
    a = torch.empty(N, dtype=torch.uint8)
    b = torch.empty(N, dtype=torch.uint8)

def test_unmarked_allocates_a_lot():
    keep = torch.empty(10 * N, dtype=torch.uint8)
"""


# --------------------------------------------------------------------------- limits
def test_limit_boundary_passes_at_the_limit_and_fails_one_byte_over(pytester):
    pytester.makepyfile(test_alloc=ALLOCATING_TESTS)
    result = _run(pytester, "-rf")
    result.assert_outcomes(passed=4, failed=2)
    outcomes = {r.nodeid.split("::")[1]: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport")
                if r.when == "call"}
    assert outcomes == {"test_at_limit": "passed", "test_at_limit_in_units": "passed",
                        "test_one_byte_over": "failed", "test_peak_not_total": "passed",
                        "test_two_alive": "failed", "test_unmarked_allocates_a_lot": "passed"}
    result.stdout.fnmatch_lines([
        "vram_limit: test used 976.56 KiB (1000000 B), over its 976.56 KiB (999999 B) limit by 1 B "
        "(peak of live tensor bytes on cpu)",
        "vram_limit: test used 1.91 MiB (2000000 B), over its 1.91 MiB (1999999 B) limit by 1 B "
        "(peak of live tensor bytes on cpu)",
    ])
    assert "Traceback" not in result.stdout.str()


def test_summary_lists_the_measured_tests_only(pytester):
    pytester.makepyfile(test_alloc=ALLOCATING_TESTS)
    result = _run(pytester)
    out = result.stdout.str()
    summary = out.split("vram peaks (peak of live tensor bytes on cpu)")[1].split("short test summary")[0]
    lines = [line for line in summary.splitlines() if "::" in line]
    assert len(lines) == 5
    assert lines[0].split()[:2] == ["1.91", "MiB"] and lines[0].endswith("test_alloc.py::test_two_alive")
    assert "test_unmarked_allocates_a_lot" not in summary


def test_unmarked_tests_are_not_measured_and_do_not_import_torch(pytester):
    pytester.makepyfile("""
        import sys
        def test_plain():
            assert "torch" not in sys.modules
    """)
    result = pytester.runpytest_subprocess(*PLUGIN)
    result.assert_outcomes(passed=1)
    assert "vram peaks" not in result.stdout.str()


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, profiler.integrations.pytest_plugin; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("marker, expected", [
    ('"4 parsecs"', "vram_limit('4 parsecs') is not a size: unknown size unit 'parsecs'"),
    ('"lots"', "vram_limit('lots') is not a size: cannot read 'lots' as a size"),
    ("-1", "vram_limit(-1) is not a size: a size must not be negative"),
    (f'"{"9" * 400}GiB"', "is too large to be a number of bytes"),  # issue 26: was an OverflowError
    ("", "vram_limit takes one argument, the limit"),
])
def test_bad_limit_fails_the_test_with_the_valid_units_and_does_not_run_it(pytester, marker, expected):
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.vram_limit({marker})
        def test_bad():
            raise RuntimeError("the body ran")
    """)
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert expected in out
    if marker:
        assert f"valid units: {VALID_UNITS}" in out
    assert "the body ran" not in out and "Traceback" not in out


def test_a_failing_body_keeps_its_own_failure(pytester):
    pytester.makepyfile(f"""
        import pytest, torch
        @pytest.mark.vram_limit(10)
        def test_fails_itself():
            keep = torch.empty({N}, dtype=torch.uint8)
            assert 1 == 2, "its own assertion"
    """)
    result = _run(pytester, "--vram-save-baseline", "base.json")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "its own assertion" in out and "vram_limit: test used" not in out
    assert "(test did not complete)" in out
    assert json.loads((pytester.path / "base.json").read_text()) == {}  # a partial peak is no baseline


# --------------------------------------------------------------------------- baselines
def _alloc_test(pytester, nbytes: int) -> None:
    pytester.makepyfile(test_grow=f"""
        import torch
        def test_grows():
            keep = torch.empty({nbytes}, dtype=torch.uint8)
    """)


def test_save_baseline_then_fail_on_increase_with_tolerance_boundaries(pytester):
    _alloc_test(pytester, N)
    saved = _run(pytester, "--vram-measure-all", "--vram-save-baseline", "base.json")
    saved.assert_outcomes(passed=1)
    saved.stdout.fnmatch_lines(["vram baseline: 1 peak(s) saved to base.json"])
    assert json.loads((pytester.path / "base.json").read_text()) == {"test_grow.py::test_grows": N}

    _alloc_test(pytester, N + 20_000)  # 2% more
    check = ("--vram-baseline", "base.json", "--vram-fail-on-increase")
    # the baseline's tests are measured without --vram-measure-all or a marker
    over = _run(pytester, *check)
    over.assert_outcomes(failed=1)
    over.stdout.fnmatch_lines(["vram baseline: test used 996.09 KiB, 19.53 KiB (+2.0%) over its baseline of "
                               "976.56 KiB in base.json, more than the tolerance of 0 = 0 B "
                               "(peak of live tensor bytes on cpu)"])
    for tolerance, outcome in [("2%", "passed"), ("1.99%", "failed"), ("20000", "passed"),
                               ("19999B", "failed"), ("1MiB", "passed")]:
        result = _run(pytester, *check, "--vram-increase-tolerance", tolerance)
        assert result.parseoutcomes() == {outcome: 1}, tolerance

    # without --vram-fail-on-increase the growth is reported, not failed
    report = _run(pytester, "--vram-baseline", "base.json")
    report.assert_outcomes(passed=1)
    report.stdout.fnmatch_lines(["*996.09 KiB  baseline 976.56 KiB (+2.0%)  test_grow.py::test_grows"])


def test_save_baseline_merges_over_the_entries_already_saved(pytester):
    (pytester.path / "base.json").write_text(json.dumps({"test_other.py::test_gone": 7}))
    _alloc_test(pytester, N)
    _run(pytester, "--vram-measure-all", "--vram-save-baseline", "base.json").assert_outcomes(passed=1)
    assert load_baseline(pytester.path / "base.json") == {"test_grow.py::test_grows": N,
                                                           "test_other.py::test_gone": 7}


@pytest.mark.parametrize("content, problem", [
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ("[1, 2]", "must hold a JSON object mapping test ids to peak bytes, not a list"),
    ('{"t.py::test": "1MiB"}', "the peak of 't.py::test' is '1MiB', not a non-negative integer number of bytes"),
    ('{"t.py::test": -5}', "the peak of 't.py::test' is -5"),
    ('{"t.py::test": true}', "the peak of 't.py::test' is True"),
    (None, "cannot read vram baseline file base.json: No such file or directory"),
])
def test_malformed_baseline_is_a_usage_error(pytester, content, problem):
    if content is not None:
        (pytester.path / "base.json").write_text(content)
    _alloc_test(pytester, N)
    result = _run(pytester, "--vram-baseline", "base.json", "--vram-fail-on-increase")
    assert result.ret == USAGE_ERROR
    err = result.stderr.str()
    assert "ERROR: --vram-baseline:" in err and "base.json" in err and problem in err
    assert "Traceback" not in err + result.stdout.str()


@pytest.mark.parametrize("args, message", [
    (("--vram-fail-on-increase",), "--vram-fail-on-increase needs --vram-baseline FILE"),
    (("--vram-increase-tolerance", "5 parsecs"), "--vram-increase-tolerance: unknown size unit 'parsecs'"),
    (("--vram-increase-tolerance=-2%",), "--vram-increase-tolerance: a tolerance must not be negative"),
    (("--vram-top", "-1"), "--vram-top must be 0 (all) or a positive count"),
    (("--vram-increase-tolerance", "9" * 400 + "GiB"), "is too large to be a number of bytes"),  # issue 26
    (("--vram-save-baseline", "/dev/null"), "/dev/null is a character device, not a regular file"),  # issue 26
])
def test_bad_options_are_usage_errors(pytester, args, message):
    _alloc_test(pytester, N)
    result = _run(pytester, *args)
    assert result.ret == USAGE_ERROR
    assert message in result.stderr.str()


# --------------------------------------------------------------------------- pure parts
def test_result_long_repr_and_tolerance():
    ok = VramResult("t::a", peak_bytes=100, backend="cpu", limit_bytes=100, baseline_bytes=90,
                    allowed_increase_bytes=10)
    assert not ok.failed and ok.long_repr == ""
    both = VramResult("t::a", peak_bytes=5 * 2**30 + 2**27, backend="cuda", limit_bytes=4 * 2**30,
                      baseline_bytes=5 * 2**30, allowed_increase_bytes=0, tolerance="0", baseline_path="b.json")
    assert both.long_repr.splitlines() == [
        "vram_limit: test used 5.12 GiB, over its 4.00 GiB limit by 1.12 GiB "
        "(growth of torch.cuda.max_memory_allocated on cuda)",
        "vram baseline: test used 5.12 GiB, 128.00 MiB (+2.5%) over its baseline of 5.00 GiB in b.json, "
        "more than the tolerance of 0 = 0 B (growth of torch.cuda.max_memory_allocated on cuda)"]
    partial = VramResult("t::a", peak_bytes=10**9, backend="cpu", completed=False, limit_bytes=1)
    assert not partial.failed  # the body's own failure is what the report shows
    assert parse_tolerance("2%").allowed(1_000_000) == 20_000
    assert parse_tolerance("1MiB") == Tolerance(nbytes=2**20, text="1MiB")
    with pytest.raises(ValueError, match="cannot read '2x%' as a percentage"):
        parse_tolerance("2x%")


def test_summary_lines_are_largest_first_and_capped():
    results = [VramResult(f"t::{i}", peak_bytes=i * 1024, backend="cpu") for i in range(1, 6)]
    lines = summary_lines(results, top=2)
    assert [line.split()[-1] for line in lines[:2]] == ["t::5", "t::4"]
    assert lines[2] == "... and 3 more (--vram-top 0 lists all)"
    assert len(summary_lines(results, top=0)) == 5


# --------------------------------------------------------------------------- entry point, GPU
def _entry_point_installed() -> bool:
    return any(ep.name == "vramlab" for ep in entry_points(group="pytest11"))


@pytest.mark.skipif(not _entry_point_installed(),
                    reason="vramlab's pytest11 entry point is not installed (pip install -e . registers it)")
def test_entry_point_registers_the_marker(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.vram_limit(limit): fail the test if the peak tensor memory*"])


@pytest.mark.gpu
def test_cuda_limit_boundary(pytester):
    pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; the cpu backend's boundary tests above run everywhere")
    # CUDACachingAllocator rounds every request up to a multiple of 512 bytes (kMinBlockSize),
    # and max_memory_allocated counts the rounded block: 10**6 -> 1_000_448.
    rounded = -(-N // 512) * 512
    pytester.makepyfile(f"""
        import pytest, torch
        @pytest.mark.vram_limit({rounded})
        def test_at():
            keep = torch.empty({N}, dtype=torch.uint8, device="cuda")
        @pytest.mark.vram_limit({rounded - 1})
        def test_over():
            keep = torch.empty({N}, dtype=torch.uint8, device="cuda")
    """)
    result = pytester.runpytest(*PLUGIN, "--vram-backend", "cuda")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["vram_limit: test used * over its * limit by 1 B "
                                 "(growth of torch.cuda.max_memory_allocated on cuda)"])
