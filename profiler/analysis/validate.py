"""Validation: predicted beside measured, per case and category, with summary errors for
the estimator (uncalibrated, calibrated, leave-one-out) and for simpler predictors."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

from estimator.modelspec import ModelSpec, load_model
from estimator.overheads import Overheads
from estimator.setup import Mode, Precision, Quant, Setup

from profiler.analysis.calibrate import points, selected_loo, summary
from profiler.record import case_label

GB = 10**9


@lru_cache(maxsize=256)
def _spec(model: str) -> Optional[ModelSpec]:
    try:
        return load_model(model)
    except ValueError:
        return None


def rules_of_thumb(spec: ModelSpec, setup: Setup, params: int) -> int:
    """REFERENCE.md (Deep Learning 101, 2023): inference 4X fp32 / 2X half / 1X int8; full
    training 16X fp32, 12X fp16/bf16; LoRA only as 7B: 16-24 GB, read as 20/7 X here."""
    x = params / 1e9
    if setup.mode is Mode.INFERENCE:
        per = 1 if setup.quant is not Quant.NONE else (4 if setup.precision is Precision.FP32 else 2)
    elif setup.mode is Mode.FULL:
        per = 16 if setup.precision in (Precision.FP32, Precision.AMP_BF16, Precision.AMP_FP16) else 12
    else:
        per = 20 / 7
    return int(per * x * GB)


def accelerate_rule(spec: ModelSpec, setup: Setup, params: int) -> int:
    """``accelerate estimate-memory``: the load size in the parameter dtype, and 4x that for
    training with Adam (accelerate/commands/estimate.py); it has no LoRA rule (load size)."""
    load = params * setup.precision.param_bytes
    return 4 * load if setup.mode is Mode.FULL else load


def korthikanti(spec: ModelSpec, setup: Setup, params: int) -> int:
    """ZeRO's 16 bytes/param for full training (2 for inference/frozen weights) plus
    Korthikanti et al. 2022's sbh(34 + 5as/h) per layer (no recomputation)."""
    s, b, h, a, L = setup.seq, setup.batch, spec.hidden_size, spec.num_heads, spec.num_layers
    states = 16 * params if setup.mode is Mode.FULL else setup.precision.param_bytes * params
    if setup.mode is Mode.INFERENCE:
        return states
    return int(states + L * s * b * h * (34 + 5 * a * s / h))


SIMPLE_PREDICTORS = {"rules_of_thumb": rules_of_thumb, "accelerate": accelerate_rule, "korthikanti": korthikanti}


@dataclass
class CaseRow:
    key: str
    label: str
    measured: int
    reserved: Optional[int]
    nvml: Optional[int]
    uncalibrated: int
    calibrated: Optional[int]
    loo_error: float
    predicted_reserved: Optional[int] = None
    predicted_total: Optional[int] = None  # tensors + allocator + context: what NVML should see
    nvml_process: Optional[int] = None  # NVML used minus the idle baseline before CUDA init
    simple: Dict[str, int] = field(default_factory=dict)
    categories_measured: Dict[str, int] = field(default_factory=dict)
    categories_predicted: Dict[str, int] = field(default_factory=dict)

    def error(self, predicted: Optional[int]) -> Optional[float]:
        return None if predicted is None else (predicted - self.measured) / self.measured


@dataclass
class Validation:
    rows: List[CaseRow]
    summaries: Dict[str, Dict[str, float]]
    calibration_source: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"cases": len(self.rows)}
        out.update(self.summaries)
        if self.calibration_source:
            out["calibration"] = self.calibration_source
        return out


def validate(records: Sequence[dict], calibration: Optional[Overheads] = None) -> Validation:
    pts = points(records)
    if not pts:
        raise ValueError("no ok records with a measured peak to validate")
    loo, _ = selected_loo(pts)
    rows: List[CaseRow] = []
    for p, lo in zip(pts, loo):
        r = p.record
        m = r["measured"]
        case = r["case"]
        setup = Setup.from_dict(case["setup"])
        spec = _spec(case["model"])
        calibrated = None
        if calibration is not None:
            calibrated = int(round(p.predict(dict(calibration.activation_factors), calibration.constant_bytes)))
        simple = {}
        if spec is not None:
            params = r["predicted"]["params"]
            simple = {name: fn(spec, setup, params) for name, fn in SIMPLE_PREDICTORS.items()}
        phase = m.get("peak_phase")
        rows.append(CaseRow(
            key=p.key, label=case_label(r), measured=p.y, reserved=m.get("peak_reserved_bytes"),
            nvml=m.get("nvml_peak_used_bytes"), uncalibrated=int(round(p.predict({}, 0.0))),
            calibrated=calibrated, loo_error=lo, simple=simple,
            predicted_reserved=r["predicted"].get("reserved_bytes"),
            predicted_total=r["predicted"].get("total_bytes"),
            nvml_process=(m["nvml_peak_used_bytes"] - m.get("nvml_idle_used_bytes", 0))
            if m.get("nvml_peak_used_bytes") else None,
            categories_measured=dict(m.get("categories", {})),
            categories_predicted=dict(r["predicted"]["phases"].get(phase, r["predicted"]["components"]))))
    summaries = {"uncalibrated": summary([row.error(row.uncalibrated) for row in rows]),
                 "calibrated_loo": summary(loo)}
    if calibration is not None:
        summaries["calibrated"] = summary([row.error(row.calibrated) for row in rows])
    for name in SIMPLE_PREDICTORS:
        errs = [row.error(row.simple[name]) for row in rows if name in row.simple]
        summaries[name] = summary(errs)
    return Validation(rows, summaries, calibration.source if calibration else None)
