"""Baseline vs current records: regressions in measured peak, reserved, NVML and in the
estimate's error, as a markdown report fit for a pull-request comment."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from estimator.units import GiB, MiB, parse_bytes
from profiler.record import Record, Status

#: (name, the Measured field compared)
METRICS = (("peak allocated", "peak_allocated_bytes"), ("peak reserved", "peak_reserved_bytes"),
           ("NVML peak", "nvml_peak_used_bytes"))


@dataclass(frozen=True)
class Threshold:
    fraction: float = 0.0
    bytes: int = 0

    @classmethod
    def parse(cls, text: str) -> Threshold:
        t = str(text).strip()
        if t.endswith("%"):
            try:
                value = float(t[:-1]) / 100
            except ValueError:
                raise ValueError(f"cannot read threshold {text!r}: write a percentage (2%) "
                                 f"or a size (256MiB)") from None
            if value < 0:
                raise ValueError(f"threshold must not be negative, got {text!r}")
            return cls(fraction=value)
        return cls(bytes=parse_bytes(t))

    def exceeded(self, base: int, current: int) -> bool:
        return current - base > (self.fraction * base if self.fraction else self.bytes)

    def __str__(self) -> str:
        return f"{100 * self.fraction:g}%" if self.fraction else f"{self.bytes / MiB:g} MiB"


def match_key(record: Record) -> str:
    """Cases match by model, setup, backend and steps (not by config hash or host)."""
    c = record.case
    return json.dumps([c.model, c.setup, c.backend, c.steps, record.rank or 0], sort_keys=True)


@dataclass
class Finding:
    case: str
    metric: str
    baseline: float
    current: float
    regression: bool


@dataclass
class Comparison:
    findings: list[Finding] = field(default_factory=list)
    only_baseline: list[str] = field(default_factory=list)
    only_current: list[str] = field(default_factory=list)
    status_changes: list[tuple[str, str, str]] = field(default_factory=list)
    matched: int = 0

    @property
    def regressed(self) -> bool:
        return any(f.regression for f in self.findings) or any(
            new != Status.OK.value and old == Status.OK.value for _, old, new in self.status_changes)


def _error(record: Record) -> float | None:
    peak, p = record.measured.peak_allocated_bytes, record.predicted
    if not peak or p is None:
        return None
    return abs(p.allocated_bytes - peak) / peak


def compare(baseline: Sequence[Record], current: Sequence[Record], threshold: Threshold) -> Comparison:
    base = {match_key(r): r for r in baseline}
    cur = {match_key(r): r for r in current}
    out = Comparison()
    out.only_baseline = sorted(base[k].case.label(backend=True) for k in base.keys() - cur.keys())
    out.only_current = sorted(cur[k].case.label(backend=True) for k in cur.keys() - base.keys())
    for key in sorted(base.keys() & cur.keys()):
        b, c = base[key], cur[key]
        out.matched += 1
        label = c.case.label(backend=True)
        if b.status is not c.status:
            out.status_changes.append((label, b.status.value, c.status.value))
        if not (b.ok and c.ok):
            continue
        for name, field_name in METRICS:
            bv, cv = getattr(b.measured, field_name), getattr(c.measured, field_name)
            if bv is None or cv is None:
                continue
            out.findings.append(Finding(label, name, bv, cv, threshold.exceeded(bv, cv)))
        be, ce = _error(b), _error(c)
        if be is not None and ce is not None:
            # the estimate's |error| regresses when it grows by more than the threshold's fraction
            # of the measured peak (or, for a byte threshold, by that many bytes of the peak)
            peak = c.measured.peak_allocated_bytes
            allowed = threshold.fraction if threshold.fraction else threshold.bytes / peak
            out.findings.append(Finding(label, "estimate |error|", be, ce, ce - be > allowed))
    return out


def markdown(cmp: Comparison, threshold: Threshold) -> str:
    verdict = "**memory regression**" if cmp.regressed else "no regression"
    lines = [f"### vramlab compare: {verdict}", "",
             f"{cmp.matched} cases matched; threshold {threshold}.", ""]
    flagged = [f for f in cmp.findings if f.regression]
    if flagged:
        lines += ["| case | metric | baseline | current | change |", "|---|---|---|---|---|"]
        for f in flagged:
            if f.metric == "estimate |error|":
                lines.append(f"| {f.case} | {f.metric} | {100 * f.baseline:.2f}% | {100 * f.current:.2f}% | "
                             f"{100 * (f.current - f.baseline):+.2f} pt |")
            else:
                lines.append(f"| {f.case} | {f.metric} | {f.baseline / GiB:.3f} GiB | {f.current / GiB:.3f} GiB | "
                             f"{100 * (f.current - f.baseline) / f.baseline:+.2f}% |")
        lines.append("")
    for label, old, new in cmp.status_changes:
        lines.append(f"- status of {label}: {old} -> {new}")
    if cmp.only_baseline:
        lines += ["", "Only in the baseline:"] + [f"- {x}" for x in cmp.only_baseline]
    if cmp.only_current:
        lines += ["", "Only in the current run:"] + [f"- {x}" for x in cmp.only_current]
    return "\n".join(lines) + "\n"
