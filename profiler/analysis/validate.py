"""Validation: predicted beside measured, per case and category, with summary errors for
the estimator (uncalibrated, calibrated, leave-one-out) and for simpler predictors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from estimator.categories import TENSOR_CATEGORIES
from estimator.modelspec import ModelSpec, load_model
from estimator.overheads import Overheads
from estimator.setup import Mode, Optimizer, Precision, Quant, Setup
from estimator.units import BILLION, GB
from profiler.analysis.calibrate import points, selected_loo, summary
from profiler.record import Record


@lru_cache(maxsize=256)
def _spec(model: str) -> ModelSpec | None:
    try:
        return load_model(model)
    except ValueError:
        return None


#: ``--estimate``: which prediction a record is validated with
ESTIMATES = ("current", "recorded")
#: the record's library versions a current estimate assumes (estimator/versions.py LIBRARIES)
_RECORD_LIBRARIES = ("torch", "transformers", "peft")


def current_setup(record: Record) -> Setup:
    """The record's setup under the library versions it ran with (its own ``versions``
    field where the setup names none) and as its loop ran it (the profiler's harness builds
    the model from its config and empties the cache between training steps:
    measure/run.py harness_setup; a Trainer callback's steps are the Trainer's own), for
    today's estimator."""
    from profiler.measure.harness import harness_setup
    setup = Setup.from_dict(record.case.setup)
    if record.source != "trainer_callback":
        setup = harness_setup(setup, record.backend)
    if setup.versions:
        return setup
    ran = {k: v for k, v in (record.versions or {}).items() if k in _RECORD_LIBRARIES and v and v != "absent"}
    return setup.replace(versions=ran) if ran else setup


def with_estimates(records: Sequence[Record], which: str = "current") -> tuple[list[Record], int, int]:
    """``records`` with the prediction ``which`` names: ``recorded``, the estimate frozen in
    each record when it ran; ``current``, today's estimator under each record's versions
    (:func:`current_setup`), for records whose model still loads with the same config.
    Returns (records, re-estimated, differing from the recorded)."""
    if which not in ESTIMATES:
        raise ValueError(f"--estimate must be one of: {', '.join(ESTIMATES)}; got {which!r}")
    if which == "recorded":
        return list(records), 0, 0
    from dataclasses import replace

    from estimator.estimate import estimate
    from estimator.gpus import gpu_named
    from profiler.record import Prediction
    out, redone, moved = [], 0, 0
    for r in records:
        spec = _spec(r.case.model) if r.ok and r.predicted is not None and r.case.setup else None
        if spec is None or (r.case.config_hash and spec.config_hash != r.case.config_hash):
            out.append(r)
            continue
        current = estimate(spec, current_setup(r), gpu_named((r.device or {}).get("name"))).to_dict()
        current["setup"] = r.predicted.setup  # the case's own setup, as recorded
        new = Prediction(**current)
        redone += 1
        moved += (new.allocated_bytes, new.phases) != (r.predicted.allocated_bytes, r.predicted.phases)
        out.append(replace(r, predicted=new))
    return out, redone, moved


def _no_step(setup: Setup) -> bool:
    """Full training without an optimizer step (--optimizer none): each rule below is taken
    without its optimizer term."""
    return setup.mode is Mode.FULL and setup.optimizer is Optimizer.NONE


def rules_of_thumb(spec: ModelSpec, setup: Setup, params: int) -> int:
    """Deep Learning 101 (2023-04-12): inference 4X fp32 / 2X half / 1X int8; full
    training 16X fp32, 12X fp16/bf16; LoRA only as 7B: 16-24 GB, read as 20/7 X here.
    Without an optimizer step: the table's weights and gradients columns (4X + 4X fp32,
    2X + 2X half)."""
    x = params / BILLION
    if not setup.training:
        per = 1 if setup.quant is not Quant.NONE else (4 if setup.precision is Precision.FP32 else 2)
    elif _no_step(setup):
        per = 8 if setup.precision.param_bytes == 4 else 4
    elif setup.mode is Mode.FULL:
        per = 16 if setup.precision in (Precision.FP32, Precision.AMP_BF16, Precision.AMP_FP16) else 12
    else:
        per = 20 / 7
    return int(per * x * GB)


def accelerate_rule(spec: ModelSpec, setup: Setup, params: int) -> int:
    """``accelerate estimate-memory``: the load size in the parameter dtype, and 4x that for
    training with Adam (accelerate/commands/estimate.py); it has no LoRA rule (load size).
    The 4x is the model, its gradients and Adam's two states; without an optimizer step, 2x."""
    load = params * setup.precision.param_bytes
    if _no_step(setup):
        return 2 * load
    return 4 * load if setup.mode is Mode.FULL else load


def korthikanti(spec: ModelSpec, setup: Setup, params: int) -> int:
    """ZeRO's 16 bytes/param for full training (2 for inference/frozen weights) plus
    Korthikanti et al. 2022's sbh(34 + 5as/h) per layer (no recomputation); without an
    optimizer step ZeRO's 2 + 2 bytes/param (half weights and gradients)."""
    s, b, h, a, L = setup.seq, setup.batch, spec.hidden_size, spec.num_heads, spec.num_layers
    states = 16 * params if setup.mode is Mode.FULL else setup.precision.param_bytes * params
    if _no_step(setup):
        states = 2 * setup.precision.param_bytes * params
    if not setup.training:
        return states
    return int(states + L * s * b * h * (34 + 5 * a * s / h))


def deepspeed_states(spec: ModelSpec, setup: Setup, params: int) -> int:
    """DeepSpeed's model-states estimate for one GPU without offload,
    ``estimate_zero2_model_states_mem_needs`` (deepspeed/runtime/zero/stage_1_and_2.py):
    4 bytes/param (fp16 weights and gradients) + 16 bytes/param / GPUs (fp32 master weights,
    gradients and Adam's states); inference and frozen weights: the 2-byte fp16 weights;
    without an optimizer step: the 4 bytes/param alone. Model states only, no activations."""
    if not setup.training:
        return 2 * params
    if setup.mode is not Mode.FULL or _no_step(setup):
        return 4 * params if setup.mode is Mode.FULL else 2 * params
    return 4 * params + 16 * params // max(setup.world_size, 1)


_TENSOR = {c.value for c in TENSOR_CATEGORIES}

#: How the summary tables name each summary (the others: their key with spaces).
SUMMARY_LABELS = {"reserved": "reserved (vs max_memory_reserved)",
                  "nvml": "NVML (vs device peak, cases alone)"}


def summary_label(name: str) -> str:
    return SUMMARY_LABELS.get(name, name.replace("_", " "))


SIMPLE_PREDICTORS = {"rules_of_thumb": rules_of_thumb, "accelerate": accelerate_rule, "korthikanti": korthikanti}


@dataclass
class CaseRow:
    key: str
    label: str
    measured: int
    reserved: int | None
    nvml: int | None
    uncalibrated: int
    calibrated: int | None
    loo_error: float
    predicted_reserved: int | None = None
    predicted_total: int | None = None  # tensors + allocator + context: what NVML should see
    nvml_process: int | None = None  # NVML used minus the idle baseline before CUDA init
    simple: dict[str, int] = field(default_factory=dict)
    categories_measured: dict[str, int] = field(default_factory=dict)
    categories_predicted: dict[str, int] = field(default_factory=dict)
    first_step: tuple[int, int] | None = None  # (measured, predicted) peak of the first step, measured apart

    def error(self, predicted: int | None) -> float | None:
        return None if predicted is None else (predicted - self.measured) / self.measured

    def category_errors(self) -> dict[str, float]:
        """(predicted - measured) per tensor category at the measured peak phase, as a
        fraction of the measured peak: where the bytes go, not only how many."""
        return {c.value: (self.categories_predicted.get(c.value, 0) - self.categories_measured.get(c.value, 0))
                / self.measured for c in TENSOR_CATEGORIES}

    @property
    def worst_category_error(self) -> float:
        return max((abs(e) for e in self.category_errors().values()), default=0.0)


@dataclass
class Validation:
    rows: list[CaseRow]
    summaries: dict[str, dict[str, float]]
    calibration_source: str | None = None

    def to_dict(self) -> dict:
        out = {"cases": len(self.rows)}
        out.update(self.summaries)
        out["worst_category"] = summary([r.worst_category_error for r in self.rows])
        if self.calibration_source:
            out["calibration"] = self.calibration_source
        return out


def _first_step(record: Record) -> tuple[int, int] | None:
    """(measured, predicted) peak allocated bytes of a harness record's first step."""
    first = record.measured.first_step
    phases = record.predicted.phases_of(first_step=True) if record.predicted else {}
    common = [ph for ph in (first or {}) if ph in phases]
    if not common:
        return None
    measured = max(first[ph].peak_allocated_bytes for ph in common)
    predicted = max(sum(v for k, v in phases[ph].items() if k in _TENSOR) for ph in common)
    return (measured, predicted) if measured else None


def validate(records: Sequence[Record], calibration: Overheads | None = None) -> Validation:
    pts = points(records)
    if not pts:
        raise ValueError("no ok records with a measured peak to validate")
    loo, _ = selected_loo(pts)
    rows: list[CaseRow] = []
    for p, lo in zip(pts, loo):
        r = p.record
        m, predicted = r.measured, r.predicted
        setup = Setup.from_dict(r.case.setup)
        spec = _spec(r.case.model)
        calibrated = None
        if calibration is not None:
            calibrated = int(round(p.predict(dict(calibration.activation_factors), calibration.constant_bytes)))
        simple = {}
        if spec is not None:
            simple = {name: fn(spec, setup, predicted.params) for name, fn in SIMPLE_PREDICTORS.items()}
        rows.append(CaseRow(
            key=p.key, label=r.label, measured=p.y, reserved=m.peak_reserved_bytes,
            nvml=m.nvml_peak_used_bytes, uncalibrated=int(round(p.predict({}, 0.0))),
            calibrated=calibrated, loo_error=lo, simple=simple,
            predicted_reserved=predicted.reserved_bytes, predicted_total=predicted.total_bytes,
            nvml_process=(m.nvml_peak_used_bytes - (m.nvml_idle_used_bytes or 0))
            if m.nvml_peak_used_bytes else None,
            categories_measured=dict(m.categories or {}),
            categories_predicted=predicted.tensors_at(m.peak_phase, first_step=bool(r.first_step)),
            first_step=_first_step(r)))
    summaries = {"uncalibrated": summary([row.error(row.uncalibrated) for row in rows]),
                 "calibrated_loo": summary(loo)}
    if calibration is not None:
        summaries["calibrated"] = summary([row.error(row.calibrated) for row in rows])
    firsts = [(p - m) / m for m, p in (row.first_step for row in rows if row.first_step)]
    if firsts:  # the first steps the harness measured apart, against the estimate of a first step
        summaries["first_step"] = summary(firsts)
    for name in SIMPLE_PREDICTORS:
        errs = [row.error(row.simple[name]) for row in rows if name in row.simple]
        summaries[name] = summary(errs)
    # Other metrics, each against its own prediction (CUDA records): the caching allocator's
    # max_memory_reserved vs the estimate's reserved bytes; NVML's device peak over the
    # idle baseline (cases that ran alone) vs tensors + allocator + context.
    reserved = [(row.predicted_reserved - row.reserved) / row.reserved for row in rows
                if row.reserved and row.predicted_reserved]
    if reserved:
        summaries["reserved"] = summary(reserved)
    nvml = [(row.predicted_total - row.nvml_process) / row.nvml_process for row in rows
            if row.nvml_process and row.predicted_total]
    if nvml:
        summaries["nvml"] = summary(nvml)
    return Validation(rows, summaries, calibration.source if calibration else None)
