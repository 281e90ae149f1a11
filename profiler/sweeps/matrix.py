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
import math
from collections.abc import Iterator
from pathlib import Path

from estimator.files import read_document
from estimator.setup import Setup
from estimator.trainers import trainer_defaults

#: The most cases a matrix may expand to unless told otherwise (``--max-cases``): the
#: largest committed matrix holds 80 (benchmarks/gpu-standard.toml), and a sweep pays
#: 10-15 s of imports per case (profiler/sweeps/campaign.py), so 1,000 cases are hours of
#: work; a matrix a hundred times larger is a typo, refused before it is expanded.
MAX_CASES = 1000
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


def _count(table: dict) -> int:
    """How many cases a table expands to (the product of its lists' lengths)."""
    return math.prod(len(v) if isinstance(v, list) else 1 for v in table.values())


def load_matrix(path: str | Path, max_cases: int = MAX_CASES) -> list[tuple[str, Setup, int]]:
    """(model, setup, steps) for every case; a malformed matrix, or one of more than
    ``max_cases`` cases, raises MatrixError."""
    if isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1:
        raise MatrixError(f"--max-cases must be a positive integer, got {max_cases!r}")
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
    total = sum(_count({**defaults, **table}) for table in tables)
    if total > max_cases:
        raise MatrixError(f"matrix {path} expands to {total} cases, more than the cap of {max_cases} "
                          f"(profiler/sweeps/matrix.py MAX_CASES); split it, or raise the cap with --max-cases N")
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
                # a trainer's defaults for what the case leaves out (--trainer sft: loss, checkpointing;
                # estimator/trainers.py), as the command line takes them
                versions = Setup(versions=case.get("versions", ())).versions
                case = {**trainer_defaults(case.get("trainer", "hf"), versions), **case}
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
