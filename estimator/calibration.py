"""Calibration files: fitted overheads, with provenance, that replace the defaults.

A calibration is JSON written by ``vramlab calibrate``; reading it needs no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import read_document
from .overheads import DEFAULT, Overheads

CALIBRATION_SCHEMA = 1
#: Committed calibrations of a checkout (results/calibration/*.json)
CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "results" / "calibration"


def load_calibration(path: str | Path) -> Overheads:
    return overheads_from_dict(read_document(path, "calibration"), str(path))


def overheads_from_dict(data: dict, where: str) -> Overheads:
    if not isinstance(data, dict) or data.get("schema") != CALIBRATION_SCHEMA:
        raise ValueError(f"{where} is not a vramlab calibration (schema {CALIBRATION_SCHEMA})")
    try:
        fit = data["overheads"]
        factors = {str(k): float(v) for k, v in fit["activation_factors"].items()}
        return Overheads(
            context_bytes=int(fit.get("context_bytes", DEFAULT.context_bytes)),
            workspace_bytes=int(fit.get("workspace_bytes", DEFAULT.workspace_bytes)),
            activation_factor=float(fit.get("activation_factor", 1.0)),
            activation_factors=factors,
            constant_bytes=int(fit.get("constant_bytes", 0)),
            allocator_fraction=None if fit.get("allocator_fraction") is None else float(fit["allocator_fraction"]),
            source=f"calibration {data.get('name', where)} ({where})")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration {where} is malformed ({type(exc).__name__}: {exc})") from None


def find_calibration(backend: str, gpu_name: str | None = None,
                     folder: Path = CALIBRATION_DIR) -> Path | None:
    """The committed calibration for this backend (and GPU, for cuda), newest first."""
    if not folder.is_dir():
        return None
    matches: list[tuple] = []
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("backend") != backend:
            continue
        if backend == "cuda" and gpu_name and str(data.get("gpu", "")).lower() != gpu_name.lower():
            continue
        matches.append((str(data.get("created", "")), path))
    return max(matches)[1] if matches else None
