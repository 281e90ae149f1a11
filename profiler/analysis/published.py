"""``vramlab validate --published``: each published GPU measurement (results/published/,
built by ``results/published/build.py`` from the transcribed sources) beside vramlab's
estimate under the row's library versions and beside the simpler predictors, each error
against the matching metric: ``max_memory_allocated`` vs the estimate's allocated bytes,
``max_memory_reserved`` vs its reserved bytes, nvidia-smi vs its total with the context.

Nothing is fitted to these rows. The headline summaries cover the pinned rows (the
configuration fully known, the model in the registry); every other row is kept with the
reason it is left out, and where vramlab can still estimate it, its error is shown."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from estimator.estimate import estimate
from estimator.files import read_input_bytes, too_deep
from estimator.gpus import GPU, get_gpu
from estimator.modelspec import load_model
from estimator.setup import Setup
from profiler.analysis.calibrate import summary
from profiler.analysis.validate import SIMPLE_PREDICTORS, deepspeed_states

PUBLISHED = Path(__file__).resolve().parents[2] / "results" / "published" / "records.jsonl"

#: the simpler predictors beside vramlab: validate's, and DeepSpeed's model-states estimate
PREDICTORS = {**SIMPLE_PREDICTORS, "deepspeed": deepspeed_states}

#: which of the estimate's totals each published metric is compared with
METRIC_TARGET = {"max_memory_allocated": "allocated_bytes", "max_memory_reserved": "reserved_bytes",
                 "nvidia-smi": "total_bytes"}

#: GPUs of the pinned rows that the preset file does not hold, by architecture only (the
#: estimate reads the architecture for the cuBLAS workspace size): NVIDIA's CUDA
#: compute-capability table, RTX 3080 Ti 8.6 (Ampere), RTX 2060 7.5 (Turing)
_ARCH_ONLY = {"ampere": "8.6", "ada": "8.9", "turing": "7.5"}


@dataclass
class PublishedRow:
    id: str
    label: str
    metric: str
    measured: int | None  # bytes
    pinned: bool
    excluded_because: list[str]
    predictions: dict[str, int] = field(default_factory=dict)  # "vramlab" and each simple predictor

    def error(self, name: str) -> float | None:
        if not self.measured or name not in self.predictions:
            return None
        return (self.predictions[name] - self.measured) / self.measured


@dataclass
class PublishedValidation:
    rows: list[PublishedRow]

    def pinned(self, metric: str | None = None) -> list[PublishedRow]:
        return [r for r in self.rows if r.pinned and (metric is None or r.metric == metric)]

    def summaries(self, metric: str) -> dict[str, dict[str, float]]:
        """median / p95 / max |error| per predictor over the pinned rows of ``metric``;
        vramlab's under "uncalibrated", as ``validate --json`` names it."""
        rows = self.pinned(metric)
        out = {"uncalibrated": summary([r.error("vramlab") for r in rows])}
        for name in PREDICTORS:
            out[name] = summary([e for e in (r.error(name) for r in rows) if e is not None])
        return out

    def headline(self) -> dict[str, dict]:
        """One headline column per metric the estimate has a figure for (allocated, reserved,
        nvidia-smi's device total): its pinned rows and their errors, and the published rows
        of that metric left out, by reason (a column with no pinned row says so)."""
        out = {}
        for metric in METRIC_TARGET:
            rows = [r for r in self.rows if r.metric == metric]
            left: dict[str, int] = {}
            for r in rows:
                if not r.pinned:
                    why = "; ".join(r.excluded_because) or "not stated"
                    left[why] = left.get(why, 0) + 1
            column = {"figure": METRIC_TARGET[metric], "cases": len(self.pinned(metric)), "published": len(rows),
                      "left_out": left}
            if self.pinned(metric):
                column["vramlab"] = self.summaries(metric)["uncalibrated"]
            out[metric] = column
        return out

    def to_dict(self) -> dict:
        """``validate --json``'s shape over the pinned max_memory_allocated rows, then the
        same per metric and the row counts."""
        head = "max_memory_allocated"
        out: dict = {"cases": len(self.pinned(head))}
        out.update(self.summaries(head))
        out["metric"] = head
        out["by_metric"] = {m: {"cases": len(self.pinned(m)), **self.summaries(m)}
                            for m in METRIC_TARGET if self.pinned(m)}
        out["headline"] = self.headline()
        out["rows"] = len(self.rows)
        out["pinned"] = len(self.pinned())
        out["excluded"] = len(self.rows) - out["pinned"]
        return out


def read_published(path: str | Path = PUBLISHED) -> list[dict]:
    """The published rows of ``path``, each checked to be one (:func:`check_row`)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no published records at {path}; build them with python results/published/build.py")
    try:
        text = read_input_bytes(path, "published records").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"published records {path} are not UTF-8 text") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(check_row(json.loads(line), f"{path} line {n}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {n} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise too_deep(f"{path} line {n}") from None
    return rows


def check_row(rec: object, where: str) -> dict:
    """``rec`` if it is a published row (an ``id`` and a ``metric`` naming what was measured
    and its bytes), else a ValueError saying what ``--published`` takes."""
    metric = rec.get("metric") if isinstance(rec, dict) else None
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or "id" not in rec:
        hint = "; a run's records are validated with vramlab validate FILE" \
            if isinstance(rec, dict) and "case_key" in rec else ""
        raise ValueError(f"{where} is not a published measurement (no id and metric name): --published takes "
                         f"the published table, results/published/records.jsonl{hint}")
    value = metric.get("bytes")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{where}: metric.bytes must be a non-negative integer or null, got {value!r}")
    return rec


def _gpu(rec: dict) -> GPU:
    """The row's GPU: the preset where there is one (L40S), else its architecture alone."""
    if "l40s" in str(rec.get("gpu")).lower():
        return get_gpu("l40s")
    arch = (rec.get("gpu_architecture") or {}).get("architecture", "hopper")
    return GPU(key=str(rec.get("gpu")), name=str(rec.get("gpu")), memory_bytes=0, architecture=arch,
               compute_capability=_ARCH_ONLY.get(arch, ""))


def _row(rec: dict) -> PublishedRow:
    metric = rec["metric"]
    row = PublishedRow(id=rec["id"], label=_label(rec), metric=str(metric.get("name")),
                       measured=metric.get("bytes"), pinned=bool(rec.get("pinned")),
                       excluded_because=list(rec.get("excluded_because") or []))
    if rec.get("setup") and rec.get("registry_model") and row.metric in METRIC_TARGET:
        spec = load_model(rec["registry_model"])
        setup = Setup.from_dict(rec["setup"])
        est = estimate(spec, setup, _gpu(rec))
        row.predictions["vramlab"] = getattr(est, METRIC_TARGET[row.metric])
        for name, fn in PREDICTORS.items():
            row.predictions[name] = fn(spec, setup, est.params)
    return row


def _label(rec: dict) -> str:
    model = rec.get("registry_model") or str(rec.get("model"))[:40]
    parts = [model, str(rec.get("attention") or ""), f"b{rec.get('batch')}", f"s{rec.get('seq')}"]
    return " ".join(p for p in parts if p and p not in ("bNone", "sNone"))


def validate_published(path: str | Path = PUBLISHED) -> PublishedValidation:
    return PublishedValidation([_row(rec) for rec in read_published(path)])


def rows_table_md(result: PublishedValidation) -> str:
    """Every row: the published value, vramlab's and each predictor's error; left-out rows
    with their reason."""
    names = ["vramlab", *PREDICTORS]
    lines = ["| row | configuration | metric | published MB | " + " | ".join(names) + " | pinned |",
             "|---|---|---|---:|" + "---:|" * len(names) + "---|"]
    for r in result.rows:
        errs = [r.error(n) for n in names]
        cells = ["" if e is None else f"{100 * e:+.1f}%" for e in errs]
        value = "" if r.measured is None else f"{r.measured / 1e6:,.1f}"
        pinned = "yes" if r.pinned else "no: " + "; ".join(r.excluded_because)[:160]
        lines.append(f"| {r.id} | {r.label} | {r.metric[:28]} | {value} | " + " | ".join(cells) + f" | {pinned} |")
    return "\n".join(lines)
