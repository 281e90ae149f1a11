"""Run a matrix, each case in a subprocess; resume, shard, and record failures as data."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from estimator.estimate import estimate
from estimator.modelspec import ModelSpec, load_model
from estimator.setup import Setup
from profiler.measure.procs import checkout_env, die_with_parent
from profiler.measure.run import make_case
from profiler.record import (
    Case,
    Record,
    RecordError,
    Status,
    append_record,
    check_record,
    new_record,
    read_records,
    repair_tail,
)
from profiler.sweeps.matrix import load_matrix

#: Seconds one case may run before it is recorded as an error (a hung kernel, a swap storm).
DEFAULT_CASE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Planned:
    """One case of a matrix, ready to run: its model (as the matrix names it and loaded),
    its setup as given, its steps and the case it will record."""

    model: str
    spec: ModelSpec
    setup: Setup
    steps: int
    case: Case

    @property
    def key(self) -> str:
        return self.case.key


def plan(matrix: str | Path, backend: str, shard: tuple[int, int] = (0, 1)) -> list[Planned]:
    """The cases of this shard, each checked by the estimator (a case it rejects is a
    malformed matrix)."""
    i, n = shard
    specs: dict[str, ModelSpec] = {}
    out = []
    for index, (model, setup, steps) in enumerate(load_matrix(matrix)):
        if index % n != i:
            continue
        if model not in specs:
            specs[model] = load_model(model)
        try:
            estimate(specs[model], setup)
        except ValueError as exc:
            raise ValueError(f"matrix {matrix}, case {index + 1} ({model}): {exc}") from None
        out.append(Planned(model, specs[model], setup, steps,
                           make_case(specs[model], setup, backend, steps, model=model)))
    return out


def done_keys(out: Path) -> set[str]:
    if not out.exists():
        return set()
    repair_tail(out)  # a record cut short by a kill was never completed
    return {r.case_key for r in read_records(out)}


def run_in_subprocess(job: Planned, backend: str, timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
                      timeline: bool = False) -> Record:
    request = json.dumps({"model": job.model, "setup": job.setup.to_dict(), "backend": backend,
                          "steps": job.steps, "timeline": timeline})
    try:
        proc = subprocess.run([sys.executable, "-m", "profiler.sweeps.worker"], input=request, text=True,
                              errors="replace", capture_output=True, timeout=timeout_s, env=checkout_env(),
                              preexec_fn=die_with_parent)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        message = f"worker exited with code {proc.returncode}: {tail}"
        if proc.returncode == 0 and lines:
            try:
                return check_record(json.loads(lines[-1]), "worker output")
            except (json.JSONDecodeError, RecordError) as exc:
                message = f"worker printed an unreadable record ({exc})"
    except subprocess.TimeoutExpired:
        message = f"case ran past {timeout_s:.0f} s and was stopped"
    return new_record(job.case, Status.ERROR, message)


def sweep(matrix: str | Path, backend: str, out: str | Path, shard: tuple[int, int] = (0, 1),
          timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
          on_case: Callable[[int, int, Record], None] | None = None,
          runner: Callable[..., Record] = run_in_subprocess, timeline: bool = False) -> list[Record]:
    """Run every case of the shard not yet in ``out``; append each record as it finishes."""
    if timeout_s <= 0:
        raise ValueError(f"the case timeout must be positive, got {timeout_s}")
    out = Path(out)
    done = done_keys(out)
    todo = [job for job in plan(matrix, backend, shard) if job.key not in done]
    records = []
    for n, job in enumerate(todo, start=1):
        record = runner(job, backend, timeout_s, timeline)
        append_record(out, record)
        records.append(record)
        if on_case:
            on_case(n, len(todo), record)
    return records
