"""Records: one JSON object per run (and rank) per line, appended with flush + fsync.

Readers validate every line and name a bad one by its number. A final line cut short
by a kill is not a completed record: ``repair_tail`` drops it before appending again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, List

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "error")
REQUIRED = ("schema", "case", "case_key", "status", "backend")


class RecordsError(ValueError):
    pass


def case_key(case: dict) -> str:
    """Identity of a case: model, config hash, setup, steps and backend."""
    text = json.dumps(case, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def validate(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: a record must be a JSON object")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordsError(f"{where}: record lacks {', '.join(missing)}")
    if record["schema"] != SCHEMA_VERSION:
        raise RecordsError(f"{where}: schema {record['schema']!r} is not {SCHEMA_VERSION}")
    if record["status"] not in STATUSES:
        raise RecordsError(f"{where}: status {record['status']!r} is not one of {', '.join(STATUSES)}")
    case = record["case"]
    if not isinstance(case, dict) or not isinstance(case.get("setup"), dict) or \
            not all(k in case for k in ("model", "backend")):
        raise RecordsError(f"{where}: case must be an object with model, setup and backend")
    measured = record.get("measured") or {}
    if not isinstance(measured, dict):
        raise RecordsError(f"{where}: measured must be an object")
    for key, value in measured.items():
        if key.endswith("_bytes") and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise RecordsError(f"{where}: measured.{key} must be an integer number of bytes")
    return record


def read_records(path: "str | Path", allow_partial_tail: bool = False) -> List[dict]:
    """All records of a JSONL file; a malformed line raises RecordsError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordsError(f"cannot read records file {path}: {exc.strerror}") from None
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: a write cut short
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if last and allow_partial_tail:
                break
            raise RecordsError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        out.append(validate(record, f"{path}, line {number}"))
    return out


def case_label(record: dict, backend: bool = False) -> str:
    """A short human name of a record's case: model, mode, precision, batch x seq, attention."""
    c, s = record["case"], record["case"]["setup"]
    label = f"{c['model']} {s['mode']} {s['precision']} b{s['batch']}x{s['seq']} {s['attn']}"
    label += " ckpt" if s.get("grad_ckpt") else ""
    return label + (f" [{c['backend']}]" if backend else "")


def iter_records(paths) -> Iterator[dict]:
    for p in paths:
        yield from read_records(p)


def repair_tail(path: "str | Path") -> int:
    """Drop an unterminated last line (a record whose write was killed). Returns bytes cut."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as fh:
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return len(data) - keep


def append_record(path: "str | Path", record: dict) -> None:
    """One line, one write, flushed and fsynced."""
    validate(record, "record to write")
    line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
