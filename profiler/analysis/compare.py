"""Baseline vs current records: regressions in measured peak, reserved and NVML, as a
markdown report fit for a pull-request comment. The gate fails closed.

- Nothing to compare (no records on either side) and records that cannot be told apart
  (one case twice in a file) are bad input: :class:`CompareError`.
- A measured figure that grew by more than the threshold is a memory regression; one
  that fell by more is an improvement, reported and never failing.
- A case that was ok and is not any more is a status regression.
- A measurement missing from one side of a case that is ok on both fails the gate: the
  peak allocated bytes always (every backend measures them), any other metric when the
  other side has it. A metric neither side measured (reserved bytes on cpu) is not compared.
- A baseline case missing from the current records fails the gate unless missing cases
  are allowed; no matched case at all always fails it.
- Growth of the estimate's |error| is a separate check, on only when asked for
  (``error_growth``): it fails when |error| grew by more than that many points of the
  measured peak. A measured peak that fell makes the same estimate look worse, which is
  why it is not part of the memory check.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from estimator.units import GiB, MiB, parse_bytes
from profiler.record import Record, Status

#: (name, the Measured field compared)
METRICS = (("peak allocated", "peak_allocated_bytes"), ("peak reserved", "peak_reserved_bytes"),
           ("NVML peak", "nvml_peak_used_bytes"))
#: The metric every ok record measures (cuda: max_memory_allocated; cpu, sim: tracked bytes).
REQUIRED_METRIC = "peak_allocated_bytes"
#: The metric name of the opt-in check on the estimate's |error|.
ERROR_METRIC = "estimate |error|"


class CompareError(ValueError):
    """Records that cannot be compared: exit code 2 from the CLI."""


def _finite_fraction(value: float, what: str, text: object) -> float:
    if not math.isfinite(value) or value < 0:
        raise CompareError(f"{what} must be a finite number >= 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Threshold:
    """How much a measured figure may move before it counts: a fraction of the baseline,
    or a number of bytes (one of them; both zero means any growth counts)."""

    fraction: float = 0.0
    bytes: int = 0

    def __post_init__(self):
        _finite_fraction(self.fraction, "a threshold's fraction", self.fraction)
        if isinstance(self.bytes, bool) or not isinstance(self.bytes, int) or self.bytes < 0:
            raise CompareError(f"a threshold's bytes must be an integer >= 0, got {self.bytes!r}")
        if self.fraction and self.bytes:
            raise CompareError("a threshold is a fraction or a number of bytes, not both")

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = str(text).strip()
        if t.endswith("%"):
            return cls(fraction=parse_points(t, "threshold"))
        try:
            return cls(bytes=parse_bytes(t))
        except ValueError as exc:
            raise CompareError(f"threshold {text!r}: {exc}") from None

    def allowed(self, base: int) -> float:
        """The change in bytes a figure of ``base`` bytes may make."""
        return self.fraction * base if self.fraction else self.bytes

    def exceeded(self, base: int, current: int) -> bool:
        """Grew by more than allowed (from a zero baseline: any growth under a fraction)."""
        return current - base > self.allowed(base)

    def improved(self, base: int, current: int) -> bool:
        return base - current > self.allowed(base)

    def __str__(self) -> str:
        return f"{100 * self.fraction:g}%" if self.fraction else f"{self.bytes / MiB:g} MiB"


def parse_points(text: str, what: str = "--error-growth") -> float:
    """``"1%"`` -> 0.01: a percentage, finite and >= 0."""
    t = str(text).strip()
    if not t.endswith("%"):
        raise CompareError(f"{what} takes a percentage such as 2%, got {text!r}")
    try:
        value = float(t[:-1]) / 100
    except ValueError:
        raise CompareError(f"cannot read {what} {text!r}: write a percentage such as 2%") from None
    return _finite_fraction(value, what, text)


def match_key(record: Record) -> str:
    """Cases match by model, setup, backend, steps, rank and (Trainer runs) global step;
    not by config hash or host."""
    c = record.case
    key = [c.model, c.setup, c.backend, c.steps, record.rank or 0]
    if record.step is not None:
        key.append(record.step)
    return json.dumps(key, sort_keys=True)


@dataclass
class Finding:
    case: str
    metric: str
    baseline: float
    current: float
    regression: bool
    improvement: bool = False


@dataclass
class Comparison:
    findings: list[Finding] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)   # missing from the current records
    only_current: list[str] = field(default_factory=list)
    status_changes: list[tuple[str, str, str]] = field(default_factory=list)
    missing_metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (case, metric, side lacking it)
    matched: int = 0
    error_growth: float | None = None                         # the opt-in check, when on

    @property
    def memory_regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression and f.metric != ERROR_METRIC]

    @property
    def error_regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.regression and f.metric == ERROR_METRIC]

    @property
    def improvements(self) -> list[Finding]:
        return [f for f in self.findings if f.improvement]

    @property
    def status_regressions(self) -> list[tuple[str, str, str]]:
        return [c for c in self.status_changes if c[1] == Status.OK.value and c[2] != Status.OK.value]

    @property
    def regressed(self) -> bool:
        """A memory, status or (when asked for) estimate-error regression."""
        return bool(self.memory_regressions or self.status_regressions or self.error_regressions)

    def failures(self, allow_missing: bool = False) -> list[str]:
        """Why the gate fails, shortest first; empty when it passes."""
        out = []
        if self.memory_regressions:
            out.append("memory regression")
        if self.status_regressions:
            out.append("status regression")
        if self.error_regressions:
            out.append("estimate error growth")
        if self.missing_metrics:
            out.append("missing measurement")
        if self.matched == 0:
            out.append("no case matched")
        elif self.only_baseline and not allow_missing:
            out.append("cases missing")
        return out


def _error(record: Record) -> float | None:
    peak, p = record.measured.peak_allocated_bytes, record.predicted
    if not peak or p is None:
        return None
    return abs(p.allocated_bytes - peak) / peak


def _index(records: Sequence[Record], name: str) -> dict[str, Record]:
    if not records:
        raise CompareError(f"{name} holds no records: a run that measured nothing cannot pass the gate")
    counts = Counter(match_key(r) for r in records)
    twice = {k: n for k, n in counts.items() if n > 1}
    if twice:
        first = {match_key(r): r for r in reversed(records)}
        named = "; ".join(f"{first[k].case.label(backend=True)} ({n} records)" for k, n in twice.items())
        raise CompareError(f"{name} holds one case more than once, so it cannot be compared: {named}; "
                           f"keep one record per case (and rank)")
    return {match_key(r): r for r in records}


def _labels(records: dict[str, Record]) -> dict[str, str]:
    """A readable name per match key; names that two cases share (they differ in a knob
    the short label leaves out) get a piece of the key's hash."""
    labels = {k: r.case.label(backend=True) for k, r in records.items()}
    shared = {name for name, n in Counter(labels.values()).items() if n > 1}
    return {k: f"{name} #{hashlib.sha256(k.encode()).hexdigest()[:6]}" if name in shared else name
            for k, name in labels.items()}


def compare(baseline: Sequence[Record], current: Sequence[Record], threshold: Threshold,
            error_growth: float | None = None,
            names: tuple[str, str] = ("the baseline", "the current records")) -> Comparison:
    """Match the cases and compare them. ``error_growth`` (a fraction of the measured peak)
    turns on the estimate-error check. CompareError on empty or duplicated input, naming
    the side by ``names``."""
    if error_growth is not None:
        _finite_fraction(error_growth, "the error growth", error_growth)
    base, cur = _index(baseline, names[0]), _index(current, names[1])
    labels = _labels({**base, **cur})
    out = Comparison(error_growth=error_growth)
    out.only_baseline = sorted(labels[k] for k in base.keys() - cur.keys())
    out.only_current = sorted(labels[k] for k in cur.keys() - base.keys())
    for key in sorted(base.keys() & cur.keys()):
        b, c = base[key], cur[key]
        out.matched += 1
        label = labels[key]
        if b.status is not c.status:
            out.status_changes.append((label, b.status.value, c.status.value))
        if not (b.ok and c.ok):
            continue
        for name, field_name in METRICS:
            bv, cv = getattr(b.measured, field_name), getattr(c.measured, field_name)
            if bv is None or cv is None:
                if field_name == REQUIRED_METRIC or (bv, cv) != (None, None):
                    out.missing_metrics.append((label, name, names[0] if bv is None else names[1]))
                continue
            out.findings.append(Finding(label, name, bv, cv, threshold.exceeded(bv, cv),
                                        threshold.improved(bv, cv)))
        be, ce = _error(b), _error(c)
        if error_growth is not None and be is not None and ce is not None:
            out.findings.append(Finding(label, ERROR_METRIC, be, ce, ce - be > error_growth))
    return out


def _change(f: Finding) -> str:
    if f.baseline == 0:
        return "from 0 B"
    return f"{100 * (f.current - f.baseline) / f.baseline:+.2f}%"


def _table(findings: Sequence[Finding]) -> list[str]:
    lines = ["| case | metric | baseline | current | change |", "|---|---|---|---|---|"]
    for f in findings:
        if f.metric == ERROR_METRIC:
            lines.append(f"| {f.case} | {f.metric} | {100 * f.baseline:.2f}% | {100 * f.current:.2f}% | "
                         f"{100 * (f.current - f.baseline):+.2f} pt |")
        else:
            lines.append(f"| {f.case} | {f.metric} | {f.baseline / GiB:.3f} GiB | {f.current / GiB:.3f} GiB | "
                         f"{_change(f)} |")
    return lines + [""]


def markdown(cmp: Comparison, threshold: Threshold, allow_missing: bool = False) -> str:
    failures = cmp.failures(allow_missing)
    verdict = f"**{', '.join(failures)}**" if failures else "no regression"
    checks = f"threshold {threshold}"
    if cmp.error_growth is not None:
        checks += f"; estimate |error| may grow by {100 * cmp.error_growth:g} pt"
    lines = [f"### vramlab compare: {verdict}", "", f"{cmp.matched} cases matched; {checks}.", ""]
    flagged = cmp.memory_regressions + cmp.error_regressions
    if flagged:
        lines += _table(flagged)
    for label, old, new in cmp.status_changes:
        lines.append(f"- status of {label}: {old} -> {new}")
    if cmp.missing_metrics:
        lines += ["Measurements missing (a case that measured nothing cannot pass):"]
        lines += [f"- {label}: {metric} missing from {side}" for label, metric, side in cmp.missing_metrics]
    if cmp.improvements:
        lines += ["", "Improvements (not failures):", ""] + _table(cmp.improvements)
    if cmp.only_baseline:
        allowed = " (allowed)" if allow_missing else ""
        lines += ["", f"Missing from the current run{allowed}:"] + [f"- {x}" for x in cmp.only_baseline]
    if cmp.only_current:
        lines += ["", "Only in the current run:"] + [f"- {x}" for x in cmp.only_current]
    return "\n".join(lines) + "\n"
