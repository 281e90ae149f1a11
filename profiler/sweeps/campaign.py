"""The one-call campaign: a whole matrix in a few persistent workers, several at once when
their predicted peaks fit the card together, every record streamed to disk as it ends.

Why: a lent GPU machine gives one session 15 minutes in all, one call at most 10, and a
subprocess per case pays 10-15 s of imports and CUDA initialisation each time. Here each
worker process pays them once and runs cases in-process between two settles
(:mod:`profiler.measure.isolation`), so a case measures as if it ran alone in a fresh process.

Scheduling. Cases are ordered by predicted reserved bytes, largest first (the estimator
is asked, as for any case). The largest pending case goes to the next idle worker when
its predicted need, plus what the running cases were admitted with, fits the card's free
memory (CUDA: ``mem_get_info`` after every worker's context exists; sim and cpu: a
pretend card, ``card_bytes``); otherwise nothing else starts until it fits, so big cases
never starve. A case predicted larger than the card runs alone. A case that runs out of
memory while anything else ran beside it is not a data point: its record is dropped and
it runs again alone. Only an out-of-memory when alone is recorded as ``oom``.

What concurrency does to the numbers. ``max_memory_allocated`` / ``reserved`` belong to
each process and stay exact. NVML's device totals are shared: a record keeps them only
when its case ran alone (no other case and no test run overlapped it), with the other
workers' contexts taken out of its context figure; otherwise only NVML's per-process
figure (where the driver shows it) stays, and ``campaign.nvml_scope`` says which.

Workers speak JSON lines: the campaign sends ``init`` (measure the CUDA context; one
worker at a time, while no case runs, so NVML's before/after is this worker's alone),
``case`` and ``exit``; a worker answers ``imported``, ``ready`` and ``record``. A worker
that crashes, runs past the case timeout, or ends a case unclean is replaced; the case
it held gets an ``error`` record (or, when unclean, its own record with the reason).
Each record is appended with flush + fsync as it arrives, so a call killed at its limit
keeps everything measured, and a rerun with the same records file skips those cases.
"""
from __future__ import annotations

import datetime
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from estimator.estimate import estimate
from estimator.setup import Setup
from estimator.units import GiB
from profiler.measure.build import missing_extra
from profiler.measure.procs import CHILD_CWD, checkout_env, die_with_parent, python_command, signals_raise
from profiler.measure.run import backend_setup
from profiler.record import (
    Record,
    RecordError,
    Status,
    append_record,
    check_record,
    lock_records,
    new_record,
)
from profiler.sweeps.matrix import MAX_CASES
from profiler.sweeps.sweep import Planned, check_seconds, done_keys, plan

#: Headroom kept free on the card beyond the admitted predictions: the estimator's own
#: error on unmeasured setups is unknown until the first CUDA records exist, so admit a
#: case with its prediction + 15 % (at least 1 GiB), and keep 2 GiB of the card unused.
ADMIT_FRACTION = 0.15
ADMIT_MIN_BYTES = 1 * GiB
CARD_RESERVE_BYTES = 2 * GiB
#: The gpu-marked test run is admitted as if it needed this much (smollm2-135m bf16 b2x256
#: and 1 MB tensors: far less), and it makes every case beside it "not alone".
TESTS_RESERVE_BYTES = 4 * GiB
#: Pretend card for sim and cpu rehearsals: an H100 80GB (estimator/data/gpus.json).
DEFAULT_CARD_BYTES = 80 * GiB
#: A worker that dies before it is ready this many times in a row ends the campaign.
MAX_START_FAILURES = 3
#: NVML keys that are device-wide, kept only for cases that ran alone.
DEVICE_NVML_KEYS = ("nvml_idle_used_bytes", "nvml_context_bytes", "nvml_peak_used_bytes", "nvml_timeline")


@dataclass
class Job:
    """One planned case and what the scheduler knows of it."""
    index: int
    planned: Planned
    need_bytes: int            # predicted reserved bytes + admission headroom
    exclusive: bool = False    # runs with nothing beside it (too big, or an OOM rerun)
    attempts: int = 0

    @property
    def key(self) -> str:
        return self.planned.key


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen
    log_path: Path
    state: str = "starting"    # starting -> imported -> initializing -> ready <-> busy -> dead
    replacement: bool = False  # started in the slot of a worker that ended
    buffer: bytes = b""
    job: Job | None = None
    started: float = 0.0       # when the current job was sent
    overlapped: bool = False   # something else ran while the current job ran
    context: dict = field(default_factory=dict)
    context_clean: bool = False
    cases_run: int = 0
    hello: dict = field(default_factory=dict)


def _default_workers(backend: str) -> int:
    cores = os.cpu_count() or 1
    return max(1, min(3 if backend == "cuda" else 2, cores))


def plan_jobs(matrix: str | Path, backend: str, done: set[str], card_bytes: int | None = None,
              max_cases: int = MAX_CASES) -> list[Job]:
    """The matrix's cases not yet done, largest predicted need first; a case whose optional extra
    is not installed (trl, bitsandbytes: build.missing_extra) is left out with a line on stderr,
    as a sweep skips it, so a later campaign with the extra runs it."""
    jobs = []
    for index, planned in enumerate(plan(matrix, backend, max_cases=max_cases)):
        if planned.key in done:
            continue
        missing = missing_extra(backend_setup(planned.setup, backend))
        if missing:
            print(f"campaign: skipped {planned.case.label()}: {missing}", file=sys.stderr, flush=True)
            continue
        predicted = estimate(planned.spec, backend_setup(planned.setup, backend)).reserved_bytes
        need = predicted + max(ADMIT_MIN_BYTES, int(predicted * ADMIT_FRACTION))
        jobs.append(Job(index, planned, need, exclusive=card_bytes is not None and need > card_bytes))
    jobs.sort(key=lambda j: (-j.need_bytes, j.index))
    return jobs


def _nvml_device_used() -> int | None:
    """Device memory NVML reports used now (None without NVML); no CUDA initialisation."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:
        return None


class Campaign:
    """Run ``matrix`` on ``backend`` into ``records``; see the module docstring."""

    def __init__(self, matrix: str | Path, backend: str, records: str | Path, *,
                 workers: int | None = None, budget_s: float = 330.0, case_timeout_s: float = 120.0,
                 card_bytes: int | None = None, tests: Sequence[str] | None = None,
                 tests_log: str | Path | None = None, log_dir: str | Path | None = None,
                 worker_cmd: Sequence[str] | None = None, say: Callable[[str], None] = print,
                 max_cases: int = MAX_CASES):
        self.budget_s = check_seconds(budget_s, "the budget")
        self.case_timeout_s = check_seconds(case_timeout_s, "the case timeout")
        self.max_cases = max_cases
        self.matrix, self.backend, self.records = Path(matrix), backend, Path(records)
        self.n_workers = workers or _default_workers(backend)
        if self.n_workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.n_workers}")
        self.card_bytes = card_bytes if card_bytes is not None else (
            None if backend == "cuda" else DEFAULT_CARD_BYTES)
        self.tests, self.tests_log = (list(tests) if tests else None), tests_log
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="vramlab-campaign-"))
        self.worker_cmd = list(worker_cmd) if worker_cmd else python_command("profiler.sweeps.campaign", "worker")
        self.say = say
        self.sel = selectors.DefaultSelector()
        self.workers: dict[int, _Worker] = {}
        self.pending: list[Job] = []
        self.done_rows: list[dict] = []   # one per written record: seconds per case
        self.counts = {"ok": 0, "oom": 0, "error": 0}
        self.start_failures = 0
        self.tests_proc: subprocess.Popen | None = None
        self.tests_started = self.tests_seconds = None
        self.free_bytes: int | None = None
        self.idle_device_bytes: int | None = None
        self.device: dict = {}
        self.versions: dict = {}
        self.resumed = 0
        self.stopped_by_budget = False
        self.interrupted = False  # Ctrl-C, SIGTERM or SIGHUP ended it
        # The first context a CUDA worker measured alone: a worker that replaces another
        # initialises while cases run (NVML's before/after is not its own then) and takes it.
        self.context_reference: dict | None = None
        self.first_round_done = False  # every initial worker has been ready once

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: int) -> None:
        env = checkout_env()
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.log_dir / f"worker-{slot}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(self.worker_cmd + [self.backend], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, env=env, cwd=CHILD_CWD, preexec_fn=die_with_parent)
        log.close()
        os.set_blocking(proc.stdout.fileno(), False)
        w = _Worker(slot, proc, log_path, replacement=slot in self.workers)
        self.workers[slot] = w
        self.sel.register(proc.stdout, selectors.EVENT_READ, w)

    def _send(self, w: _Worker, msg: dict) -> bool:
        try:
            w.proc.stdin.write((json.dumps(msg) + "\n").encode())
            w.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def _kill(self, w: _Worker) -> None:
        if w.proc.poll() is None:
            w.proc.kill()
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.sel.unregister(w.proc.stdout)
        except (KeyError, ValueError):
            pass
        for stream in (w.proc.stdin, w.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        w.state = "dead"

    def _log_tail(self, w: _Worker) -> str:
        try:
            lines = w.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return (lines or ["no output"])[-1][:300]

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.state == "busy"]

    def _something_runs(self) -> bool:
        return bool(self._busy()) or self._tests_running()

    def _tests_running(self) -> bool:
        return self.tests_proc is not None and self.tests_proc.poll() is None

    def _retiring(self) -> bool:
        """A worker is exiting: its context is being freed, NVML's device figure moves."""
        return any(w.state == "retiring" and w.proc.poll() is None for w in self.workers.values())

    # ------------------------------------------------------------------ messages
    def _on_message(self, w: _Worker, msg: dict) -> None:
        op = msg.get("op")
        if op == "imported":
            w.state, w.hello = "imported", msg
        elif op == "ready":
            w.state = "ready"
            w.context = msg.get("context") or {}
            if w.context and w.context_clean and not w.context.get("assumed_from") and self.context_reference is None:
                self.context_reference = dict(w.context, assumed_from=f"worker {w.slot}'s measured context")
            self.device = self.device or msg.get("device") or {}
            self.versions = self.versions or msg.get("versions") or {}
            if msg.get("free_bytes") is not None:
                self.free_bytes = int(msg["free_bytes"])  # the last worker's view: every context exists
            self.start_failures = 0
        elif op == "record" and w.job is not None:
            try:
                record = check_record(msg.get("record"), f"worker {w.slot}'s record")
            except RecordError as exc:
                record = new_record(w.job.planned.case, Status.ERROR, str(exc))
            self._finish(w, record, bool(msg.get("clean")))

    def _finish(self, w: _Worker, record: Record, clean: bool) -> None:
        job, seconds = w.job, round(time.monotonic() - w.started, 3)
        w.job, w.cases_run = None, w.cases_run + 1
        w.state = "ready" if clean else "retiring"
        if not clean:
            self._send(w, {"op": "exit"})
        alone = not w.overlapped
        if record.case_key != job.key:
            record = new_record(job.planned.case, Status.ERROR,
                                f"worker answered for case {record.case_key!r}, not {job.key!r}")
        if record.status is Status.OOM and not alone and job.attempts < 2:
            job.exclusive = True  # an OOM beside other cases says nothing about this case: run it alone
            self.pending.insert(0, job)
            self.say(f"  oom beside other cases: {record.label} runs again alone")
            return
        self._annotate(record, w, alone, seconds, job)
        self._write(record, seconds, w.slot, alone)

    def _annotate(self, record: Record, w: _Worker, alone: bool, seconds: float, job: Job) -> None:
        m = record.measured
        scope = None
        if any(getattr(m, k) is not None for k in DEVICE_NVML_KEYS + ("nvml_peak_process_bytes",)):
            if alone and w.context_clean and self.idle_device_bytes is not None:
                others = sum(int(o.context.get("context_bytes") or 0) for o in self.workers.values()
                             if o is not w and o.state != "dead")
                m.nvml_idle_used_bytes = self.idle_device_bytes + others
                if m.nvml_peak_used_bytes is not None and m.peak_reserved_bytes is not None and m.categories:
                    m.categories["context"] = max(0, m.nvml_peak_used_bytes - m.nvml_idle_used_bytes
                                                  - m.peak_reserved_bytes)
                scope = "device"
            else:
                for k in DEVICE_NVML_KEYS:
                    setattr(m, k, None)
                if m.categories:
                    m.categories["context"] = 0
                scope = "process" if m.nvml_peak_process_bytes is not None else "none"
        record.campaign = {"worker": w.slot, "worker_pid": w.proc.pid, "worker_case_index": w.cases_run,
                           "ran_alone": alone, "case_s": seconds, "attempts": job.attempts, "nvml_scope": scope}
        record.timings.case_s = seconds

    def _write(self, record: Record, seconds: float, slot: int, alone: bool) -> None:
        append_record(self.records, record)
        status = record.status.value
        self.counts[status] = self.counts.get(status, 0) + 1
        self.done_rows.append({"case": record.label, "status": status, "seconds": seconds, "worker": slot,
                               "alone": alone, "case_key": record.case_key})
        n = len(self.done_rows)
        msg = f" ({record.message[:120]})" if status != "ok" else ""
        self.say(f"[{n}/{self.total}] {seconds:6.1f} s  w{slot}  {status:5s} {record.label}{msg}")

    def _lost(self, w: _Worker, why: str) -> None:
        """The worker died or was killed: its job gets an error record, its slot a new process."""
        job = w.job
        self._kill(w)
        if job is not None:
            seconds = round(time.monotonic() - w.started, 3)
            record = new_record(job.planned.case, Status.ERROR, why)
            self._annotate(record, w, not w.overlapped, seconds, job)
            self._write(record, seconds, w.slot, not w.overlapped)
            w.job = None
        elif w.cases_run == 0 and w.state != "retiring":
            self.start_failures += 1
            self.say(f"worker {w.slot} failed to start: {self._log_tail(w)}")
        if self.pending and self.start_failures < MAX_START_FAILURES:
            self._spawn(w.slot)

    def _read(self, w: _Worker) -> None:
        try:
            chunk = os.read(w.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return  # nothing to read right now
        except (OSError, ValueError):
            chunk = b""
        if chunk:
            w.buffer += chunk
            *lines, w.buffer = w.buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    try:
                        self._on_message(w, json.loads(line))
                    except json.JSONDecodeError:
                        pass
            return
        code = w.proc.wait()
        if w.state == "retiring":
            self._kill(w)
            if self.pending:
                self._spawn(w.slot)
            return
        self._lost(w, f"worker exited with code {code}: {self._log_tail(w)}")

    # ------------------------------------------------------------------ scheduling
    def _gate_inits(self) -> None:
        """On CUDA one worker initialises at a time, and only while no case runs, so NVML's
        before/after difference is that worker's context alone."""
        cuda = self.backend == "cuda"
        if cuda and any(w.state == "initializing" for w in self.workers.values()):
            return
        for w in sorted(self.workers.values(), key=lambda w: w.slot):
            if w.state != "imported":
                continue
            if cuda and w.replacement and self.context_reference is not None:
                # a replacement: it initialises at once beside the running cases and takes
                # the measured context (every worker is the same program on the same card)
                w.context_clean = False
                if self._send(w, {"op": "init", "context": self.context_reference}):
                    w.state = "initializing"
                continue
            if cuda and self._busy():
                return
            w.context_clean = not self._tests_running() and not self._retiring()
            if self._send(w, {"op": "init"}):
                w.state = "initializing"
            if cuda:
                return

    def _budget(self) -> int | None:
        if self.card_bytes is not None:
            return self.card_bytes
        if self.free_bytes is None:
            return None
        return max(0, self.free_bytes - CARD_RESERVE_BYTES)

    def _dispatch(self) -> None:
        budget = self._budget()
        if budget is None:
            return
        waiting = any(w.state in ("imported", "initializing") and not (w.replacement and self.context_reference)
                      for w in self.workers.values())
        if self.backend == "cuda" and (waiting or self.free_bytes is None):
            return  # a worker waits to measure its context: let the running cases drain first
        while self.pending:
            idle = [w for w in self.workers.values() if w.state == "ready"]
            if not idle:
                return
            busy = self._busy()
            in_use = sum(w.job.need_bytes for w in busy) + (TESTS_RESERVE_BYTES if self._tests_running() else 0)
            head = self.pending[0]
            if head.exclusive or head.need_bytes > budget:
                if self._something_runs():
                    return
            elif in_use + head.need_bytes > budget:
                return
            if any(w.job is not None and w.job.exclusive for w in busy):
                return
            self.pending.pop(0)
            w = idle[0]
            head.attempts += 1
            w.job, w.state, w.started, w.overlapped = head, "busy", time.monotonic(), self._something_runs()
            for other in busy:
                other.overlapped = True
            if not self._send(w, {"op": "case", "model": head.planned.model, "setup": head.planned.case.setup,
                                  "steps": head.planned.steps, "key": head.key}):
                self._lost(w, "worker closed its input before the case was sent")

    def _start_tests(self) -> None:
        if not self.tests or self.tests_proc is not None:
            return
        if not self.first_round_done:
            if any(w.state in ("starting", "imported", "initializing") for w in self.workers.values()):
                return  # after every initial worker has measured its context (not after replacements)
            self.first_round_done = True
        log = open(self.tests_log, "wb") if self.tests_log else subprocess.DEVNULL
        self.tests_proc = subprocess.Popen(self.tests, stdout=log, stderr=subprocess.STDOUT, cwd=CHILD_CWD,
                                           env=checkout_env(), preexec_fn=die_with_parent)
        if log is not subprocess.DEVNULL:
            log.close()
        self.tests_started = time.monotonic()
        for w in self._busy():
            w.overlapped = True
        self.say(f"gpu-marked tests started beside the cases: {' '.join(self.tests)}")

    def _check_timeouts(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.state == "busy" and now - w.started > self.case_timeout_s:
                self._lost(w, f"case ran past {self.case_timeout_s:.0f} s and its worker was stopped")
        if self.tests_proc is not None and self.tests_seconds is None and self.tests_proc.poll() is not None:
            self.tests_seconds = round(now - self.tests_started, 1)
            self.say(f"gpu-marked tests ended with code {self.tests_proc.returncode} in {self.tests_seconds} s")

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Run the matrix holding the records file's lock (a second writer stops at once)."""
        with lock_records(self.records, warn=self.say):
            return self._run()

    def _run(self) -> dict:
        t0 = time.monotonic()
        deadline = t0 + self.budget_s
        self.started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        done = done_keys(self.records, warn=self.say)
        self.pending = plan_jobs(self.matrix, self.backend, done, self.card_bytes, self.max_cases)
        self.resumed = len(done)
        self.total = len(self.pending)
        self.say(f"{self.total} cases to run ({len(done)} already in {self.records}); {self.n_workers} workers, "
                 f"budget {self.budget_s:.0f} s")
        if self.backend == "cuda":
            self.idle_device_bytes = _nvml_device_used()  # before any worker has a context
        with signals_raise():  # SIGTERM, SIGHUP: as Ctrl-C, every finished case stays on disk
            try:
                if self.pending:
                    for slot in range(min(self.n_workers, len(self.pending))):
                        self._spawn(slot)
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        self.stopped_by_budget = bool(self.pending or self._busy())
                        break
                    self._check_timeouts(now)
                    self._gate_inits()
                    self._dispatch()
                    self._start_tests()
                    live = [w for w in self.workers.values() if w.state != "dead"]
                    if not self.pending and not self._busy():
                        break
                    if not live:
                        self.say("no worker could start; the campaign stops")
                        break
                    for key, _ in self.sel.select(timeout=min(0.5, max(0.01, deadline - now))):
                        self._read(key.data)
            except KeyboardInterrupt:
                self.stopped_by_budget = self.interrupted = True
                self.say("stopped: every finished case is on disk; run again with the same records to resume")
            finally:
                for w in self.workers.values():
                    if w.state != "dead":
                        self._send(w, {"op": "exit"})
                for w in list(self.workers.values()):
                    if w.state != "dead":
                        try:
                            w.proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            pass
                        self._kill(w)
        tests_code = None
        if self.tests_proc is not None:
            left = max(1.0, deadline + 30 - time.monotonic())
            try:
                tests_code = self.tests_proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                self.tests_proc.kill()
                tests_code = "killed at the budget"
            if self.tests_seconds is None:
                self.tests_seconds = round(time.monotonic() - self.tests_started, 1)
        return self._summary(time.monotonic() - t0, tests_code)

    def _summary(self, wall_s: float, tests_code) -> dict:
        not_run = len(self.pending) + sum(1 for w in self.workers.values() if w.job is not None)
        return {"started": self.started_at, "wall_s": round(wall_s, 1), "backend": self.backend,
                "matrix": str(self.matrix), "records": str(self.records), "workers": self.n_workers,
                "cases_planned": self.total, "cases_already_done": self.resumed, "counts": dict(self.counts),
                "not_run": not_run, "stopped_by_budget": self.stopped_by_budget, "interrupted": self.interrupted,
                "device": self.device, "versions": self.versions,
                "nvml_idle_used_bytes": self.idle_device_bytes, "card_free_bytes": self.free_bytes,
                "card_bytes": self.card_bytes,
                "worker_contexts": {str(w.slot): w.context for w in self.workers.values() if w.context},
                "tests": {"command": self.tests, "exit": tests_code, "seconds": self.tests_seconds},
                "cases": self.done_rows}


def seconds_table(summary: dict) -> str:
    """Markdown: seconds per case, grouped by model and mode, then every case."""
    rows = summary["cases"]
    groups: dict[str, list[float]] = {}
    for r in rows:
        model, mode = r["case"].split(" ")[:2]
        groups.setdefault(f"{model} {mode}", []).append(r["seconds"])
    out = [f"campaign: {len(rows)} cases in {summary['wall_s']} s wall on {summary['workers']} workers "
           f"({summary['backend']})",
           f"ok {summary['counts'].get('ok', 0)}, oom {summary['counts'].get('oom', 0)}, "
           f"error {summary['counts'].get('error', 0)}, not run {summary['not_run']}", "",
           "| model / mode | cases | total s | mean s | max s |", "|---|---:|---:|---:|---:|"]
    for name, secs in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        out.append(f"| {name} | {len(secs)} | {sum(secs):.1f} | {sum(secs) / len(secs):.1f} | {max(secs):.1f} |")
    total = sum(r["seconds"] for r in rows)
    out.append(f"| all | {len(rows)} | {total:.1f} | {total / max(1, len(rows)):.1f} | "
               f"{max((r['seconds'] for r in rows), default=0):.1f} |")
    out += ["", "| case | status | s | worker | alone |", "|---|---|---:|---:|---|"]
    out += [f"| {r['case']} | {r['status']} | {r['seconds']:.1f} | {r['worker']} | {'yes' if r['alone'] else 'no'} |"
            for r in rows]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------- worker side
def worker_main(backend: str) -> int:
    """A persistent worker: JSON lines in on stdin, JSON lines out on the original stdout;
    everything libraries print goes to stderr (the worker's log)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    import torch  # noqa: F401  (the imports this process pays once)
    import transformers  # noqa: F401

    from profiler.measure.isolation import run_isolated
    from profiler.measure.nvml import NvmlSampler
    from profiler.measure.run import device_info, measure_cuda_context
    from profiler.record import versions
    send({"op": "imported", "pid": os.getpid()})
    context = None
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.get("op")
        if op == "init":
            ready = {"op": "ready", "versions": versions()}
            if backend == "cuda":
                sampler = NvmlSampler()
                context = measure_cuda_context(sampler)
                if msg.get("context"):  # initialised beside running cases: the campaign's measured context
                    context = dict(msg["context"], process_used_bytes=context.get("process_used_bytes"))
                free, _total = torch.cuda.mem_get_info()
                ready.update(device=dict(device_info("cuda"), driver=sampler.driver), context=context,
                             free_bytes=int(free))
            else:
                ready.update(device=device_info(backend))
            send(ready)
        elif op == "case":
            record, clean = run_isolated(msg["model"], Setup.from_dict(msg["setup"]), backend,
                                         steps=int(msg["steps"]), cuda_context=context)
            send({"op": "record", "key": msg.get("key"), "record": record.to_json(), "clean": clean})
            if not clean:
                return 0
        elif op == "exit":
            return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "worker":
        return worker_main(argv[1])
    print("usage: python -m profiler.sweeps.campaign worker BACKEND (the campaign starts its own workers; "
          "run a campaign with 'vramlab campaign')", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
