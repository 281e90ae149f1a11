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
            source=f"calibration {data.get('name', where)} ({where})",
            margins=_margins(data.get("margins"), where))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration {where} is malformed ({type(exc).__name__}: {exc})") from None


def _margins(data, where: str) -> dict | None:
    """A calibration's ``margins``: per figure (reserved, total) the extreme ratios of
    measured to predicted bytes and the number of cases they come from."""
    if data is None:
        return None
    out = {}
    for name in ("reserved", "total"):
        m = data.get(name) if isinstance(data, dict) else None
        if not isinstance(m, dict) or not m.get("cases"):
            continue
        lo, hi = float(m["min_ratio"]), float(m["max_ratio"])
        if not (0 < lo <= hi):
            raise ValueError(f"calibration {where} has malformed margins for {name}: {lo}..{hi}")
        out[name] = {"min_ratio": lo, "max_ratio": hi, "cases": int(m["cases"])}
    return out or None


def committed_margins(folder: Path = CALIBRATION_DIR) -> tuple[dict | None, str]:
    """The margins of the committed CUDA calibrations (the one with the most cases), and
    where they come from: what ``fit`` uses when the calibration in force has none."""
    best: tuple[int, dict, str] | None = None
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("backend") != "cuda":
            continue
        found = _margins(data.get("margins"), str(path))
        if found and "total" in found:
            cases = found["total"]["cases"] + found.get("reserved", {}).get("cases", 0)
            if best is None or cases > best[0]:
                best = (cases, found, f"calibration {data.get('name', path.stem)} ({path.name})")
    return (best[1], best[2]) if best else (None, "")


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
