"""Fit the estimator's activation factors and constant overheads to measured records.

Per record, at the measured peak phase P, the estimate splits into x (activations and
logits, the formula terms a factor scales) and base (every other tensor term). The fit
is weighted least squares on relative error:

    measured_peak ~= base + k[group] * x + c

with one factor k per calibration group (family x attention kernel x precision class)
that has at least MIN_GROUP_CASES informative records (x >= 1% of the peak), and one
constant c. Groups without enough data keep k = 1. Leave-one-out refits without each
record and predicts it, so the reported error is honest about generalisation.
"""
from __future__ import annotations

import datetime
import hashlib
import statistics
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from estimator.calibration import CALIBRATION_SCHEMA
from estimator.categories import TENSOR_CATEGORIES
from estimator.files import check_output_path, read_input_bytes, write_atomic
from estimator.modelspec import load_model
from estimator.overheads import calibration_key
from profiler.record import Case, Record

MIN_GROUP_CASES = 2
INFORMATIVE = 0.01  # x must be at least 1% of the measured peak to inform a factor
_TENSOR = {c.value for c in TENSOR_CATEGORIES}


class Point:
    """One ok record reduced to what the fit needs."""

    __slots__ = ("key", "group", "y", "phases", "record")

    def __init__(self, record: Record):
        self.record = record
        self.key = record.case_key
        predicted = record.predicted
        self.group = predicted.calibration_key or _group_of_case(record.case)
        self.y = int(record.measured.peak_allocated_bytes)
        # per predicted phase: (base, x); a Trainer record of the first step is compared
        # with the estimate of the first step, every other record with steady state
        self.phases: dict[str, tuple[int, int]] = {}
        for name, comp in predicted.phases_of(bool(record.first_step)).items():
            x = comp.get("activations", 0) + comp.get("logits", 0)
            tensors = sum(v for k, v in comp.items() if k in _TENSOR)
            self.phases[name] = (tensors - x, x)

    def at_measured_phase(self) -> tuple[int, int]:
        phase = self.record.measured.peak_phase
        if phase in self.phases:
            return self.phases[phase]
        return max(self.phases.values(), key=lambda bx: bx[0] + bx[1])

    def predict(self, factors: dict[str, float], constant: float) -> float:
        k = factors.get(self.group, 1.0)
        return max(base + k * x for base, x in self.phases.values()) + constant


@lru_cache(maxsize=256)
def _family(model: str) -> str:
    try:
        return load_model(model).family
    except ValueError:
        return "other"


def _group_of_case(case: Case) -> str:
    """Records written before predictions carried their calibration key."""
    setup = case.setup or {}
    return calibration_key(_family(case.model), str(setup.get("attn", "sdpa")), str(setup.get("precision", "bf16")))


def points(records: Sequence[Record]) -> list[Point]:
    return [Point(r) for r in records if r.ok and r.measured.peak_allocated_bytes and r.predicted is not None]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (small dense systems)."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-18:
            raise ZeroDivisionError("singular")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit(pts: Sequence[Point], fit_constant: bool = True) -> tuple[dict[str, float], float]:
    """(factors per group, constant bytes) minimising squared relative error."""
    counts: dict[str, int] = {}
    for p in pts:
        base, x = p.at_measured_phase()
        if x >= INFORMATIVE * p.y:
            counts[p.group] = counts.get(p.group, 0) + 1
    groups = sorted(g for g, n in counts.items() if n >= MIN_GROUP_CASES)
    unknowns = len(groups) + (1 if fit_constant else 0)
    if unknowns == 0 or len(pts) < unknowns:
        return {}, 0.0
    index = {g: i for i, g in enumerate(groups)}
    scale = statistics.median(p.y for p in pts)  # the constant is solved in units of a typical peak
    ata = [[0.0] * unknowns for _ in range(unknowns)]
    atb = [0.0] * unknowns
    for p in pts:
        base, x = p.at_measured_phase()
        w = 1.0 / p.y  # relative error
        row = [0.0] * unknowns
        r = p.y
        if p.group in index:
            row[index[p.group]] = x * w
        else:
            r -= x  # k = 1 for groups without a factor
        r -= base
        if fit_constant:
            row[-1] = scale * w
        r *= w
        for i in range(unknowns):
            atb[i] += row[i] * r
            for j in range(unknowns):
                ata[i][j] += row[i] * row[j]
    # a tiny ridge keeps a constant column that is nearly collinear with a factor solvable
    for i in range(unknowns):
        ata[i][i] += 1e-12 * (ata[i][i] or 1.0)
    try:
        sol = _solve(ata, atb)
    except ZeroDivisionError:
        return {}, 0.0
    factors = {g: sol[index[g]] for g in groups}
    return factors, (sol[-1] * scale if fit_constant else 0.0)


def summary(errors: Sequence[float]) -> dict[str, float]:
    """median, p95 (nearest rank) and max of |error|, as fractions."""
    if not errors:
        return {"median": 0.0, "p95": 0.0, "max": 0.0}
    a = sorted(abs(e) for e in errors)
    rank = max(1, -(-95 * len(a) // 100))
    return {"median": statistics.median(a), "p95": a[rank - 1], "max": a[-1]}


def leave_one_out(pts: Sequence[Point], fit_constant: bool = True) -> list[float]:
    errors = []
    for i, p in enumerate(pts):
        factors, c = fit([q for j, q in enumerate(pts) if j != i], fit_constant)
        errors.append((p.predict(factors, c) - p.y) / p.y)
    return errors


def selected_loo(pts: Sequence[Point]) -> tuple[list[float], bool]:
    """Leave-one-out errors of the chosen model, and whether it fits the constant: the
    constant stays only if it lowers the leave-one-out max error (selection by LOO)."""
    without = leave_one_out(pts, fit_constant=False)
    with_c = leave_one_out(pts, fit_constant=True)
    if summary(with_c)["max"] < summary(without)["max"]:
        return with_c, True
    return without, False


def _context(records: Sequence[Record]) -> int | None:
    values = [r.measured.nvml_context_bytes for r in records
              if r.backend == "cuda" and r.measured.nvml_context_bytes is not None]
    return int(statistics.median(values)) if values else None


def calibrate(records: Sequence[Record], sources: Sequence[Path], name: str) -> dict:
    """The calibration file's content: fitted overheads, per-case errors, provenance."""
    pts = points(records)
    if not pts:
        raise ValueError("no ok records with a measured peak to calibrate on")
    backends = sorted({p.record.backend for p in pts})
    if len(backends) > 1:
        raise ValueError(f"records mix backends ({', '.join(backends)}); calibrate one backend at a time")
    loo, use_constant = selected_loo(pts)
    factors, constant = fit(pts, fit_constant=use_constant)
    cases = []
    for p, lo in zip(pts, loo):
        c = p.record.case
        unc = (p.predict({}, 0.0) - p.y) / p.y
        cases.append({"case_key": p.key, "model": c.model, "setup": c.setup, "group": p.group,
                      "measured_bytes": p.y, "uncalibrated_error": unc,
                      "fitted_error": (p.predict(factors, constant) - p.y) / p.y, "loo_error": lo})
    devices = sorted({str((p.record.device or {}).get("name", "")) for p in pts})
    versions = sorted({tuple(sorted(p.record.versions.items())) for p in pts})
    # no allocator term is fitted: reserved memory comes from the allocator replay
    # (estimator/allocations.py); the records only say how far it is (margins below)
    overheads = {"activation_factors": factors, "constant_bytes": int(round(constant))}
    context = _context(records)
    if context is not None:
        overheads["context_bytes"] = context
    spread = None
    if backends[0] == "cuda":
        from profiler.analysis.nontensor import margins
        spread = margins(records)
    return {
        "schema": CALIBRATION_SCHEMA, "name": name, "backend": backends[0],
        "gpu": devices[0] if backends[0] == "cuda" and len(devices) == 1 else None,
        "devices": devices,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "records": [{"path": str(s), "sha256": hashlib.sha256(Path(s).read_bytes()).hexdigest()}
                    for s in sources],
        "cases_used": len(pts),
        "versions": [dict(v) for v in versions],
        "overheads": overheads,
        "fit": {"cases": cases,
                "summary": {"uncalibrated": summary([c["uncalibrated_error"] for c in cases]),
                            "fitted": summary([c["fitted_error"] for c in cases]),
                            "loo": summary(loo)}},
        **({"margins": spread} if spread else {}),
    }


#: Keys a calibration rewrites on every run (its creation time): a regeneration that would
#: change nothing else keeps the committed file as it is.
VOLATILE_KEYS = ("created",)


def write_calibration(path: Path, result: dict) -> bool:
    """Write ``result`` as the calibration file at ``path``, unless the file there already
    holds the same calibration but for :data:`VOLATILE_KEYS` (regenerating from the same
    records is then a no-op). True when the file was written."""
    import json
    text = json.dumps(result, indent=2) + "\n"
    path = check_output_path(path, "calibration")  # a device or FIFO is refused, never read (/dev/full reads forever)
    try:
        old = json.loads(read_input_bytes(path, "calibration"))
    except ValueError:  # absent, unreadable or not JSON: replaced
        old = None
    if isinstance(old, dict):
        strip = lambda d: {k: v for k, v in d.items() if k not in VOLATILE_KEYS}  # noqa: E731
        if strip(old) == strip(json.loads(text)):
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, "calibration")  # a full disk never leaves half a file (estimator/files.py)
    return True
