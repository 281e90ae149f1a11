"""Run a matrix, each case in a subprocess; resume, shard, and record failures as data."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from estimator.estimate import estimate
from estimator.modelspec import load_model
from estimator.setup import Setup

from profiler.measure.run import make_case, versions
from profiler.sweeps.matrix import load_matrix
from profiler.record import (SCHEMA_VERSION, RecordsError, append_record, case_key, read_records, repair_tail,
                      validate)

#: Seconds one case may run before it is recorded as an error (a hung kernel, a swap storm).
DEFAULT_CASE_TIMEOUT_S = 900


def plan(matrix: "str | Path", backend: str, shard: Tuple[int, int] = (0, 1)):
    """The cases of this shard: (model, setup, steps, case dict)."""
    i, n = shard
    cases = load_matrix(matrix)
    specs = {}
    out = []
    for index, (model, setup, steps) in enumerate(cases):
        if index % n != i:
            continue
        if model not in specs:
            specs[model] = load_model(model)
        try:
            estimate(specs[model], setup)  # a case the estimator rejects is a malformed matrix
        except ValueError as exc:
            raise ValueError(f"matrix {matrix}, case {index + 1} ({model}): {exc}") from None
        out.append((model, setup, steps, make_case(model, setup, backend, steps, specs[model])))
    return out


def done_keys(out: Path) -> set:
    if not out.exists():
        return set()
    repair_tail(out)  # a record cut short by a kill was never completed
    return {r["case_key"] for r in read_records(out)}


def run_in_subprocess(model: str, setup: Setup, backend: str, steps: int, case: dict,
                      timeout_s: float = DEFAULT_CASE_TIMEOUT_S, timeline: bool = False) -> dict:
    request = json.dumps({"model": model, "setup": setup.to_dict(), "backend": backend, "steps": steps,
                          "timeline": timeline})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run([sys.executable, "-m", "profiler.sweeps.worker"], input=request, text=True,
                              errors="replace", capture_output=True, timeout=timeout_s, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        message = f"worker exited with code {proc.returncode}: {tail}"
        if proc.returncode == 0 and lines:
            try:
                return validate(json.loads(lines[-1]), "worker output")
            except (json.JSONDecodeError, RecordsError) as exc:
                message = f"worker printed an unreadable record ({exc})"
    except subprocess.TimeoutExpired:
        message = f"case ran past {timeout_s:.0f} s and was stopped"
    return {"schema": SCHEMA_VERSION, "case": case, "case_key": case_key(case), "backend": backend,
            "status": "error", "message": message, "versions": versions(), "measured": {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def sweep(matrix: "str | Path", backend: str, out: "str | Path", shard: Tuple[int, int] = (0, 1),
          timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
          on_case: Optional[Callable[[int, int, dict], None]] = None,
          runner: Callable = run_in_subprocess, timeline: bool = False) -> List[dict]:
    """Run every case of the shard not yet in ``out``; append each record as it finishes."""
    if timeout_s <= 0:
        raise ValueError(f"the case timeout must be positive, got {timeout_s}")
    out = Path(out)
    cases = plan(matrix, backend, shard)
    done = done_keys(out)
    todo = [c for c in cases if case_key(c[3]) not in done]
    records = []
    for n, (model, setup, steps, case) in enumerate(todo, start=1):
        record = runner(model, setup, backend, steps, case, timeout_s, timeline)
        append_record(out, record)
        records.append(record)
        if on_case:
            on_case(n, len(todo), record)
    return records
