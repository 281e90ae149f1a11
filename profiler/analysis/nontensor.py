"""What CUDA records measured beyond the allocator, and how far the estimate's reserved and
device-total figures were from them: the numbers ``estimator/data/gpus.json``
(``measured_non_tensor``) and a calibration's ``margins`` are computed from, never typed.

- the CUDA context: each record's ``nvml_context_bytes`` (NVML used after the worker's
  CUDA initialisation minus before it), the median;
- kernel modules loaded lazily: in the cases that ran alone (``campaign.ran_alone``, NVML
  read device-wide), NVML's peak less the idle card, less ``max_memory_reserved``, less the
  context; the median per kind of step (training, forward-only);
- margins: per record, the estimate's reserved bytes against ``max_memory_reserved`` and its
  device total (reserved + context + modules, the two constants computed without that
  record: leave-one-out) against NVML's peak over the idle card; the extreme ratios of
  measured to predicted bound what ``fit`` calls safe and what does not fit.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

from estimator.setup import Mode
from profiler.record import Record

KINDS = ("training", "forward")


def _kind(record: Record) -> str:
    return "training" if Mode.parse(record.case.setup.get("mode", "full")) in (Mode.FULL, Mode.LORA, Mode.QLORA) \
        else "forward"


def _cuda(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if r.ok and r.backend == "cuda" and r.measured.peak_reserved_bytes]


def _alone(r: Record) -> bool:
    c = r.campaign or {}
    m = r.measured
    return bool(c.get("ran_alone")) and c.get("nvml_scope") == "device" and m.nvml_peak_used_bytes is not None


def nvml_process_bytes(r: Record) -> int:
    """NVML's device peak over the idle card: what the run added (reserved + non-tensor)."""
    m = r.measured
    return int(m.nvml_peak_used_bytes - (m.nvml_idle_used_bytes or 0))


def context_bytes(records: Sequence[Record]) -> int | None:
    values = [r.measured.nvml_context_bytes for r in _cuda(records)
              if r.measured.nvml_context_bytes is not None and r.measured.nvml_context_bytes > 0]
    return int(statistics.median(values)) if values else None


def module_bytes(records: Sequence[Record], context: int) -> dict[str, int]:
    """Median per kind of what NVML saw beyond reserved and the context at the peak."""
    out = {}
    for kind in KINDS:
        values = [nvml_process_bytes(r) - r.measured.peak_reserved_bytes - context
                  for r in _cuda(records) if _alone(r) and _kind(r) == kind]
        if values:
            out[kind] = int(statistics.median(values))
    return out


def measured_non_tensor(records: Sequence[Record]) -> dict | None:
    """``gpus.json``'s ``measured_non_tensor`` block for these records (one GPU's)."""
    context = context_bytes(records)
    if context is None:
        return None
    modules = module_bytes(records, context)
    if "forward" not in modules and "training" in modules:
        modules["forward"] = modules["training"]
    return {"cuda_context_bytes": context, "module_bytes": modules}


def _summary(pairs: list[tuple[int, int]]) -> dict:
    """(predicted, measured) pairs: the spread of measured over predicted."""
    if not pairs:
        return {"cases": 0}
    ratios = [m / p for p, m in pairs]
    errors = sorted(abs(p - m) / m for p, m in pairs)
    rank = max(1, -(-95 * len(errors) // 100))
    return {"cases": len(pairs), "max_ratio": max(ratios), "min_ratio": min(ratios),
            "median": statistics.median(errors), "p95": errors[rank - 1], "max": errors[-1]}


def margins(records: Sequence[Record]) -> dict:
    """The leave-one-out spread of the estimate's reserved and device-total figures on
    these CUDA records (the current estimator under each record's versions and loop)."""
    from estimator.estimate import estimate
    from profiler.analysis.validate import _spec, current_setup
    cuda = [r for r in _cuda(records) if _spec(r.case.model) is not None]
    reserved, total = [], []
    for r in cuda:
        spec = _spec(r.case.model)
        if r.case.config_hash and spec.config_hash != r.case.config_hash:
            continue
        est = estimate(spec, current_setup(r))
        reserved.append((est.reserved_bytes, r.measured.peak_reserved_bytes))
        if not _alone(r):
            continue
        others = [q for q in cuda if q is not r]
        context = context_bytes(others)
        modules = module_bytes(others, context or 0)
        kind = _kind(r)
        if context is None or kind not in modules:
            continue
        total.append((est.reserved_bytes + context + modules[kind], nvml_process_bytes(r)))
    return {"reserved": _summary(reserved), "total": _summary(total),
            "method": "measured / predicted per CUDA record (uncalibrated estimate, the record's loop and "
                      "versions); the device total's context and module bytes computed without the record "
                      "(leave-one-out); nothing else in the estimate is fitted to the records"}
