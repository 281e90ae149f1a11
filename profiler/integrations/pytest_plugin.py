"""pytest plugin: fail a test whose tensor-memory peak is over its ``vram_limit``.

Modelled on pytest-memray's ``limit_memory`` marker: a ``pytest11`` entry point, the
marker registered with its help line, a result dataclass with ``long_repr``::

    @pytest.mark.vram_limit("4GiB")        # or "512MiB", "80GB", or an int of bytes
    def test_train_step(): ...

What is measured, around the test's *call* only (fixture setup and teardown are not):

``cuda`` backend
    ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` at the call's
    start, after ``gc.collect``, ``synchronize`` and ``reset_peak_memory_stats``: the
    test's own growth of the caching allocator's allocated bytes on the current device
    (its 512-byte rounding included; cached-but-free blocks and the CUDA context not).
``cpu`` backend
    The peak of live tensor-storage bytes created during the call, counted by
    :class:`profiler.measure.tracker.StorageTracker`. Tensors that existed before the call
    are not counted (nor are their frees); tensors made in other threads are not seen
    (a ``TorchDispatchMode`` is thread-local).

``auto`` (the default) picks ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.

Options: ``--vram-measure-all`` measures every test, ``--vram-save-baseline FILE`` writes
the peaks as JSON (``{nodeid: bytes}``), ``--vram-baseline FILE --vram-fail-on-increase``
fails a test whose peak grew past its baseline by more than
``--vram-increase-tolerance`` ("2%" of the baseline or a size like "1MiB").
Baselines carry no backend: compare them on the backend that wrote them.

torch is imported only when the first test is measured, so the plugin costs nothing to
projects that never use the marker.
"""
from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import pytest

from estimator.files import check_output_path, read_input_bytes, too_deep, write_atomic
from estimator.units import UNITS, format_bytes, parse_bytes

MARKER = "vram_limit"
BACKENDS = ("auto", "cuda", "cpu")
#: how the failure messages and the summary describe each backend's number
WHAT = {"cuda": "growth of torch.cuda.max_memory_allocated on cuda",
        "cpu": "peak of live tensor bytes on cpu"}
#: "KiB", "MB", ... spelled from estimator.units.UNITS, the one table of units
VALID_UNITS = ", ".join("".join(c if c == "i" else c.upper() for c in unit) for unit in UNITS)
DEFAULT_TOP = 20


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class Tolerance:
    """How far a peak may rise over its baseline: a fraction of it, or bytes."""

    fraction: Fraction = Fraction(0)
    nbytes: int = 0
    text: str = "0"

    def allowed(self, baseline: int) -> int:
        """Bytes a test may add to ``baseline`` before it fails."""
        return int(baseline * self.fraction) + self.nbytes  # floor: "more than" is strict


def parse_tolerance(text: str) -> Tolerance:
    """``"2%"`` -> 2% of the baseline; ``"1MiB"`` or ``"0"`` -> bytes. ``ValueError`` otherwise."""
    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            percent = Fraction(raw[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"cannot read {text!r} as a percentage; write e.g. 2% or 0.5%") from None
        if percent < 0:
            raise ValueError(f"a tolerance must not be negative, got {text!r}")
        return Tolerance(fraction=percent / 100, text=raw)
    try:
        return Tolerance(nbytes=parse_bytes(raw), text=raw)
    except ValueError as exc:
        raise ValueError(f"{exc} (or write a percentage of the baseline, e.g. 2%)") from None


def load_baseline(path: str | Path) -> dict[str, int]:
    """``{nodeid: peak bytes}`` from a JSON file; ``ValueError`` naming the file and problem."""
    path = Path(path)
    try:
        data = json.loads(read_input_bytes(path, "vram baseline file").decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"vram baseline file {path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"vram baseline file {path} is not valid JSON: {exc.msg} "
                         f"at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise too_deep(f"vram baseline file {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"vram baseline file {path} must hold a JSON object mapping test ids to "
                         f"peak bytes, not a {type(data).__name__}")
    for nodeid, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"vram baseline file {path}: the peak of {nodeid!r} is {value!r}, "
                             f"not a non-negative integer number of bytes")
    return data


def save_baseline(path: str | Path, peaks: dict[str, int]) -> None:
    """Write ``peaks`` merged over what ``path`` already holds (a subset run keeps the rest)."""
    path = check_output_path(path, "vram baseline file")
    merged = load_baseline(path) if path.exists() else {}
    merged.update(peaks)
    # atomic: a killed run or a full disk never leaves half a baseline
    write_atomic(path, json.dumps(dict(sorted(merged.items())), indent=1) + "\n", "vram baseline file")


@dataclass(frozen=True)
class VramOptions:
    backend: str = "auto"
    measure_all: bool = False
    baseline: dict[str, int] | None = None
    baseline_path: str | None = None
    fail_on_increase: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)
    save_path: str | None = None
    top: int = DEFAULT_TOP


def options_from_config(config: pytest.Config) -> VramOptions:
    """Read and check the command-line options; ``pytest.UsageError`` for bad ones."""
    get = config.getoption
    try:
        tolerance = parse_tolerance(get("vram_increase_tolerance"))
    except ValueError as exc:
        raise pytest.UsageError(f"--vram-increase-tolerance: {exc}") from None
    baseline_path = get("vram_baseline")
    baseline = None
    if baseline_path:
        try:
            baseline = load_baseline(baseline_path)
        except ValueError as exc:
            raise pytest.UsageError(f"--vram-baseline: {exc}") from None
    if get("vram_fail_on_increase") and baseline is None:
        raise pytest.UsageError("--vram-fail-on-increase needs --vram-baseline FILE to compare with")
    save_path = get("vram_save_baseline")
    if save_path:
        try:  # fail now, not after the whole run, if the file we would merge into is bad
            if check_output_path(save_path, "vram baseline file").exists():
                load_baseline(save_path)
        except ValueError as exc:
            raise pytest.UsageError(f"--vram-save-baseline: {exc}") from None
    backend = get("vram_backend")
    if backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--vram-backend cuda needs a CUDA GPU and torch sees none; "
                                    "use --vram-backend cpu (live tensor bytes on the CPU)")
    top = get("vram_top")
    if top < 0:
        raise pytest.UsageError(f"--vram-top must be 0 (all) or a positive count, got {top}")
    return VramOptions(backend=backend, measure_all=get("vram_measure_all"), baseline=baseline,
                       baseline_path=baseline_path, fail_on_increase=get("vram_fail_on_increase"),
                       tolerance=tolerance, save_path=save_path, top=top)


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class VramResult:
    """One measured test call (sizes in bytes)."""

    nodeid: str
    peak_bytes: int
    backend: str
    completed: bool = True
    """False when the test body raised (a failure, skip or xfail): its peak is partial."""
    limit_bytes: int | None = None
    baseline_bytes: int | None = None
    allowed_increase_bytes: int | None = None
    """Set only when ``--vram-fail-on-increase`` checks this test against its baseline."""
    tolerance: str = ""
    baseline_path: str = ""

    @property
    def over_limit(self) -> bool:
        return self.limit_bytes is not None and self.peak_bytes > self.limit_bytes

    @property
    def over_baseline(self) -> bool:
        return (self.allowed_increase_bytes is not None and self.baseline_bytes is not None
                and self.peak_bytes - self.baseline_bytes > self.allowed_increase_bytes)

    @property
    def failed(self) -> bool:
        return self.completed and (self.over_limit or self.over_baseline)

    @property
    def long_repr(self) -> str:
        """The failure message pytest shows for this test ("" when it passed)."""
        what = WHAT[self.backend]
        lines = []
        if self.over_limit:
            used, limit = format_bytes(self.peak_bytes), format_bytes(self.limit_bytes)
            if used == limit:  # 1000000 vs 999999 bytes both read "976.56 KiB"
                used, limit = f"{used} ({self.peak_bytes} B)", f"{limit} ({self.limit_bytes} B)"
            lines.append(f"vram_limit: test used {used}, over its {limit} limit by "
                         f"{format_bytes(self.peak_bytes - self.limit_bytes)} ({what})")
        if self.over_baseline:
            grew = self.peak_bytes - self.baseline_bytes
            lines.append(f"vram baseline: test used {format_bytes(self.peak_bytes)}, "
                         f"{format_bytes(grew)}{_percent(grew, self.baseline_bytes)} over its baseline of "
                         f"{format_bytes(self.baseline_bytes)} in {self.baseline_path}, more than the "
                         f"tolerance of {self.tolerance} = {format_bytes(self.allowed_increase_bytes)} ({what})")
        return "\n".join(lines)


def _percent(delta: int, base: int) -> str:
    return f" ({100 * delta / base:+.1f}%)" if base else ""


def limit_of(marker: pytest.Mark) -> int:
    """The limit of a ``vram_limit`` marker in bytes; ``ValueError`` saying how to write one."""
    args = list(marker.args) + [marker.kwargs[k] for k in marker.kwargs if k == "limit"]
    extra = sorted(k for k in marker.kwargs if k != "limit")
    if len(args) != 1 or extra:
        raise ValueError(f"vram_limit takes one argument, the limit, e.g. "
                         f"@pytest.mark.vram_limit(\"4GiB\"); got args={marker.args!r} kwargs={marker.kwargs!r}")
    raw = args[0]
    try:
        return parse_bytes(raw)
    except ValueError as exc:
        message = str(exc)
        if "valid units" not in message:
            message += f"; valid units: {VALID_UNITS}"
        raise ValueError(f"vram_limit({raw!r}) is not a size: {message}") from None


def summary_lines(results: list[VramResult], top: int = DEFAULT_TOP) -> list[str]:
    """One line per measured test, largest peak first (``top`` of them; 0 = all)."""
    rows = sorted(results, key=lambda r: (-r.peak_bytes, r.nodeid))
    shown = rows if not top else rows[:top]
    lines = []
    for r in shown:
        parts = [f"{format_bytes(r.peak_bytes):>12}"]
        if r.limit_bytes is not None:
            parts.append(f"limit {format_bytes(r.limit_bytes)}")
        if r.baseline_bytes is not None:
            parts.append(f"baseline {format_bytes(r.baseline_bytes)}"
                         f"{_percent(r.peak_bytes - r.baseline_bytes, r.baseline_bytes)}")
        if r.failed:
            parts.append("FAILED")
        elif not r.completed:
            parts.append("(test did not complete)")
        parts.append(r.nodeid)
        lines.append("  ".join(parts))
    if len(rows) > len(shown):
        lines.append(f"... and {len(rows) - len(shown)} more (--vram-top 0 lists all)")
    return lines


# ---------------------------------------------------------------------- measuring
def resolve_backend(backend: str) -> str:
    import torch

    if backend == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return backend


@contextmanager
def measure(backend: str, box: list[int]) -> Iterator[list[int]]:
    """Measure the block; ``box[0]`` holds its peak bytes once the block has exited."""
    if backend == "cuda":
        import torch

        gc.collect()  # earlier tests' garbage freed inside the call would hide the call's own growth
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        try:
            yield box
        finally:
            torch.cuda.synchronize()
            box[0] = max(0, torch.cuda.max_memory_allocated() - start)
    else:
        from profiler.measure.tracker import StorageTracker

        tracker = StorageTracker()
        start = tracker.current_bytes
        try:
            with tracker:
                yield box
        finally:
            box[0] = tracker.peak_bytes - start


class VramPlugin:
    """Per-session state: which tests to measure, their results, the baseline."""

    def __init__(self, options: VramOptions):
        self.options = options
        self.results: dict[str, VramResult] = {}
        self.backend: str | None = None  # resolved at the first measured test
        self.saved_to: str | None = None

    def _wants(self, item: pytest.Item) -> bool:
        opts = self.options
        return bool(opts.measure_all or item.get_closest_marker(MARKER) is not None
                    or (opts.baseline is not None and item.nodeid in opts.baseline))

    @pytest.hookimpl(wrapper=True, trylast=True)  # trylast: the innermost wrapper, nearest the test
    def pytest_runtest_call(self, item: pytest.Item):
        if not self._wants(item):
            return (yield)
        marker = item.get_closest_marker(MARKER)
        limit = None
        if marker is not None:
            error = None
            try:
                limit = limit_of(marker)
            except ValueError as exc:
                error = str(exc)
            if error is not None:  # outside the except: no "during handling of..." chain
                pytest.fail(error, pytrace=False)  # the test body does not run
        if self.backend is None:
            self.backend = resolve_backend(self.options.backend)
        peak = [0]
        completed = False
        try:
            with measure(self.backend, peak):
                outcome = yield
                completed = True
        finally:  # a body that raised is recorded too, with its partial peak
            result = self._result(item.nodeid, peak[0], completed, limit)
        if result.failed:
            pytest.fail(result.long_repr, pytrace=False)
        return outcome

    def _result(self, nodeid: str, peak: int, completed: bool, limit: int | None) -> VramResult:
        opts = self.options
        baseline = opts.baseline.get(nodeid) if opts.baseline is not None else None
        allowed = opts.tolerance.allowed(baseline) if opts.fail_on_increase and baseline is not None else None
        result = VramResult(nodeid=nodeid, peak_bytes=int(peak), backend=self.backend, completed=completed,
                            limit_bytes=limit, baseline_bytes=baseline, allowed_increase_bytes=allowed,
                            tolerance=opts.tolerance.text, baseline_path=opts.baseline_path or "")
        self.results[nodeid] = result
        return result

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.options.save_path
        if not path:
            return
        peaks = {r.nodeid: r.peak_bytes for r in self.results.values() if r.completed}
        save_baseline(path, peaks)
        self.saved_to = path

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.results and not self.saved_to:
            return
        tr = terminalreporter
        tr.write_sep("=", f"vram peaks ({WHAT.get(self.backend or '', 'none measured')})")
        for line in summary_lines(list(self.results.values()), self.options.top):
            tr.write_line(line)
        if self.saved_to:
            n = sum(r.completed for r in self.results.values())
            tr.write_line(f"vram baseline: {n} peak(s) saved to {self.saved_to}")


# ---------------------------------------------------------------------- pytest hooks
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vramlab", "vramlab: peak tensor memory per test")
    group.addoption("--vram-backend", choices=BACKENDS, default="auto",
                    help="what to measure: cuda (allocator peak growth), cpu (live tensor bytes via "
                         "a TorchDispatchMode) or auto (cuda if available). Default: auto.")
    group.addoption("--vram-measure-all", action="store_true", default=False,
                    help="measure every test, not only those marked vram_limit")
    group.addoption("--vram-baseline", metavar="FILE", default=None,
                    help="JSON file mapping test node ids to peak bytes, to compare against")
    group.addoption("--vram-fail-on-increase", action="store_true", default=False,
                    help="fail a test whose peak exceeds its --vram-baseline entry by more than "
                         "--vram-increase-tolerance")
    group.addoption("--vram-increase-tolerance", metavar="TOL", default="0",
                    help="allowed rise over the baseline: a percentage (2%%) or a size (1MiB). Default: 0.")
    group.addoption("--vram-save-baseline", metavar="FILE", default=None,
                    help="write the measured peaks to FILE (merged over the entries it holds)")
    group.addoption("--vram-top", metavar="N", type=int, default=DEFAULT_TOP,
                    help=f"list the N largest peaks in the summary (0: all). Default: {DEFAULT_TOP}.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(limit): fail the test if the peak tensor memory of its call exceeds limit, "
        f"a size like \"4GiB\" or \"512MiB\" or an int of bytes (units: {VALID_UNITS}). "
        f"On CUDA the growth of torch.cuda.max_memory_allocated, on CPU the live tensor bytes.")
    config.pluginmanager.register(VramPlugin(options_from_config(config)), "vramlab-vram")


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin("vramlab-vram")
    if plugin is not None:
        config.pluginmanager.unregister(plugin, "vramlab-vram")
