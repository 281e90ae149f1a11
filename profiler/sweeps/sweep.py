"""Run a matrix, each case in a subprocess; resume, shard, and record failures as data.

The records file is the sweep's only state: cases already in it are skipped, an
unfinished last line (the sweep was killed while writing) is cut and its case runs again,
and while the sweep runs it holds the file's lock so no second writer duplicates records.
A worker killed by a signal (not a case that ran out of memory: that is a data point)
can run again (``retries``); a worker never outlives the sweep.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from estimator.cli_args import check_flags
from estimator.estimate import estimate
from estimator.modelspec import ModelSpec, load_model
from estimator.setup import Setup
from profiler.measure.build import missing_extra
from profiler.measure.procs import CHILD_CWD, checkout_env, dies_with_this_process, python_command
from profiler.measure.run import backend_setup, make_case
from profiler.record import (
    Case,
    Record,
    RecordError,
    Status,
    Warn,
    append_record,
    check_record,
    lock_records,
    new_record,
    read_records,
    repair_tail,
)
from profiler.sweeps.matrix import MAX_CASES, load_matrix

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


def plan(matrix: str | Path, backend: str, shard: tuple[int, int] = (0, 1),
         max_cases: int = MAX_CASES) -> list[Planned]:
    """The cases of this shard, each checked as the CLI checks a setup (flags that
    contradict each other on this backend: :func:`estimator.cli_args.check_flags`) and by
    the estimator; a case either rejects is a malformed matrix. A matrix of more than
    ``max_cases`` cases is refused before it is expanded."""
    i, n = shard
    specs: dict[str, ModelSpec] = {}
    out = []
    for index, (model, setup, steps) in enumerate(load_matrix(matrix, max_cases)):
        if index % n != i:
            continue
        if model not in specs:
            specs[model] = load_model(model)
        try:
            check_flags(backend_setup(setup, backend))
            estimate(specs[model], setup)
        except ValueError as exc:
            raise ValueError(f"matrix {matrix}, case {index + 1} ({model}): {exc}") from None
        out.append(Planned(model, specs[model], setup, steps,
                           make_case(specs[model], setup, backend, steps, model=model)))
    return out


class WorkerKilled(Exception):
    """A case's worker died by a signal (the kernel's OOM killer, a crash in a library, a
    kill by hand); ``record`` is the error record to keep if it does not run again."""

    def __init__(self, record: Record, signame: str):
        super().__init__(record.message)
        self.record, self.signame = record, signame


def done_keys(out: Path, warn: Warn | None = None) -> set[str]:
    """Keys of the cases already recorded in ``out``, after :func:`repair_tail` (hold the
    file's lock: :func:`profiler.record.lock_records`)."""
    if not out.exists():
        return set()
    repair_tail(out, warn)
    return {r.case_key for r in read_records(out)}


def run_in_subprocess(job: Planned, backend: str, timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
                      timeline: bool = False) -> Record:
    """The case's record from a fresh worker process; an error record when the worker
    fails, runs past ``timeout_s`` or prints nothing readable. Raises :class:`WorkerKilled`
    when a signal ended the worker."""
    request = json.dumps({"model": job.model, "setup": job.setup.to_dict(), "backend": backend,
                          "steps": job.steps, "timeline": timeline})
    try:
        proc = subprocess.run(python_command("profiler.sweeps.worker"), input=request, text=True,
                              errors="replace", capture_output=True, timeout=timeout_s, env=checkout_env(),
                              cwd=CHILD_CWD, preexec_fn=dies_with_this_process())
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        message = f"worker exited with code {proc.returncode}: {tail}"
        if proc.returncode < 0:
            signame = _signal_name(-proc.returncode)
            raise WorkerKilled(new_record(job.case, Status.ERROR, f"worker was killed by {signame}"), signame)
        if proc.returncode == 0 and lines:
            try:
                return check_record(json.loads(lines[-1]), "worker output")
            except (json.JSONDecodeError, RecordError) as exc:
                message = f"worker printed an unreadable record ({exc})"
    except subprocess.TimeoutExpired:
        message = f"case ran past {timeout_s:g} s and was stopped"
    return new_record(job.case, Status.ERROR, message)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_with_retries(job: Planned, backend: str, timeout_s: float, timeline: bool, retries: int,
                     runner: Callable[..., Record] = run_in_subprocess,
                     warn: Warn | None = None) -> Record:
    """Run a case; while its worker is killed and retries are left, run it again. The
    record says how many workers were killed."""
    kills: list[str] = []
    while True:
        try:
            record = runner(job, backend, timeout_s, timeline)
        except WorkerKilled as killed:
            kills.append(killed.signame)
            if len(kills) > retries:
                record = killed.record
                if retries:
                    record.note(f"killed on all {len(kills)} runs ({', '.join(kills)})")
                return record
            if warn:
                warn(f"{job.case.label()}: worker killed by {killed.signame}; running it again "
                     f"(retry {len(kills)} of {retries})")
            continue
        if kills:
            record.note(f"ran again after its worker was killed ({', '.join(kills)})")
        return record


def check_seconds(value: float, what: str) -> float:
    """``value`` as float if it is a finite positive number of seconds; ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite positive number of seconds, got {value}")
    return float(value)


def check_sweep_options(timeout_s: float, retries: int) -> None:
    """ValueError unless the case timeout is a finite positive number of seconds and
    retries a non-negative integer."""
    check_seconds(timeout_s, "the case timeout")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}")


def sweep(matrix: str | Path, backend: str, out: str | Path, shard: tuple[int, int] = (0, 1),
          timeout_s: float = DEFAULT_CASE_TIMEOUT_S,
          on_case: Callable[[int, int, Record], None] | None = None,
          runner: Callable[..., Record] = run_in_subprocess, timeline: bool = False, retries: int = 0,
          on_start: Callable[[int, int], None] | None = None, warn: Warn | None = None,
          max_cases: int = MAX_CASES, on_skip: Callable[[int, int, Planned, str], None] | None = None) -> list[Record]:
    """Run every case of the shard not yet in ``out``; append each record as it finishes.

    Holds ``out``'s lock throughout (a second sweep on it raises RecordError at once).
    ``on_start(cases in the shard, already recorded)`` is called before the first case;
    ``warn`` hears of repaired files and killed workers. A case whose run needs an optional
    extra that is not installed (``build.missing_extra``: TRL's trainers, bitsandbytes) is
    skipped without a record, so a sweep resumed after installing it runs the case;
    ``on_skip(n, total, case, sentence)`` hears of it."""
    check_sweep_options(timeout_s, retries)
    out = Path(out)
    jobs = plan(matrix, backend, shard, max_cases)
    with lock_records(out, warn):
        done = done_keys(out, warn)
        todo = [job for job in jobs if job.key not in done]
        if on_start:
            on_start(len(jobs), len(jobs) - len(todo))
        records = []
        for n, job in enumerate(todo, start=1):
            missing = missing_extra(backend_setup(job.setup, backend))
            if missing:
                if on_skip:
                    on_skip(n, len(todo), job, missing)
                continue
            record = run_with_retries(job, backend, timeout_s, timeline, retries, runner, warn)
            append_record(out, record)
            records.append(record)
            if on_case:
                on_case(n, len(todo), record)
    return records
