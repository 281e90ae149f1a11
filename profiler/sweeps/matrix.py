"""Validation matrices (TOML): lists expand to their product.

    steps = 2                      # defaults for every case
    [[cases]]                      # each table expands on its own
    model = ["smollm2-135m", "gpt2"]
    mode = ["full", "lora"]
    precision = ["fp32", "bf16"]
    batch = [1, 2]
    seq = 128
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from estimator.files import read_document
from estimator.setup import Setup

SETUP_KEYS = set(Setup.__dataclass_fields__)
CASE_KEYS = SETUP_KEYS | {"model", "steps"}


class MatrixError(ValueError):
    pass


def _expand(table: dict, where: str) -> Iterator[dict]:
    unknown = sorted(set(table) - CASE_KEYS)
    if unknown:
        raise MatrixError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(CASE_KEYS))}")
    keys = sorted(table)
    values = [v if isinstance(v, list) else [v] for v in (table[k] for k in keys)]
    for combo in itertools.product(*values):
        yield dict(zip(keys, combo))


def load_matrix(path: str | Path) -> list[tuple[str, Setup, int]]:
    """(model, setup, steps) for every case; a malformed matrix raises MatrixError."""
    path = Path(path)
    try:
        data = read_document(path, "matrix", fmt="toml")
    except ValueError as exc:
        raise MatrixError(str(exc)) from None
    tables = data.pop("cases", None)
    if tables is None:
        tables = [{}]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise MatrixError(f"matrix {path}: [[cases]] must be an array of tables")
    defaults = data
    out: list[tuple[str, Setup, int]] = []
    seen = set()
    for i, table in enumerate(tables, start=1):
        merged = {**defaults, **table}
        if "model" not in merged:
            raise MatrixError(f"matrix {path}: case table {i} names no model")
        for case in _expand(merged, f"matrix {path}, case table {i}"):
            model = str(case.pop("model"))
            steps = int(case.pop("steps", 2))
            try:
                setup = Setup(**case)
            except (ValueError, TypeError) as exc:
                raise MatrixError(f"matrix {path}, case table {i} ({model}, {case}): {exc}") from None
            key = (model, setup, steps)
            if key not in seen:
                seen.add(key)
                out.append(key)
    if not out:
        raise MatrixError(f"matrix {path} holds no cases")
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n
