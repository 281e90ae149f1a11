"""The record: what one run (one rank, or one Trainer step) measured, beside its estimate.

The contract between the estimator, the profiler and the validator, typed in one place:
every key of the JSONL format is a field below, named once. A file holds one JSON object
per line (schema 1), appended with flush + fsync; :func:`check_record` turns a JSON
object into a :class:`Record` or raises :class:`RecordError` naming the line and the
key; :meth:`Record.to_json` writes it back. Keys this version does not know are kept
(``extra``) so an older tool never drops what a newer one wrote.

Numbers are checked where they are read: every integer and float of a record is finite
and not negative (bytes, counts, seconds), except the differences named in
:data:`SIGNED_FIELDS`; under free-form objects, every ``*_bytes`` key and every predicted
phase's categories are checked the same way.

A final line cut short by a kill (no newline, not valid JSON) is not a completed record:
readers skip it when asked to (``allow_partial_tail``, with a warning naming the line)
and :func:`repair_tail` removes it before a writer appends again. A complete last record
whose newline is missing is kept: repair appends the newline. One writer at a time:
:func:`lock_records` holds an advisory ``fcntl`` lock on the file while a sweep or a
campaign appends to it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import socket
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from estimator.files import check_output_path, read_input_bytes, too_deep

SCHEMA_VERSION = 1

#: Fields that are differences of two readings and may be negative: NVML's context figure
#: is device used - idle - reserved, and with other workers' contexts taken out of it
#: (campaign) it went below zero on the first H200 records (-131 MiB, -150 MiB).
SIGNED_FIELDS = frozenset({"nvml_context_bytes"})


class RecordError(ValueError):
    """A record or records file that does not follow the schema."""


class Status(str, Enum):
    OK = "ok"
    OOM = "oom"      # the run ran out of memory: a data point
    ERROR = "error"  # the run failed otherwise (its message says why)

    def __str__(self) -> str:
        return self.value


@dataclass
class Case:
    """What was run: model, its config's hash, the setup (``Setup.to_dict()``), measured
    steps and backend; ``nproc`` for distributed runs. ``setup`` is None only for a
    Trainer run whose setup the callback could not read."""

    model: str
    config_hash: str | None
    setup: dict[str, Any] | None
    steps: int | None
    backend: str
    nproc: int | None = None

    @property
    def key(self) -> str:
        """Identity of a case: model, config hash, setup, steps and backend (and nproc)."""
        text = json.dumps(_encode(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self, backend: bool = False) -> str:
        """A short human name: model, mode, precision, batch x seq, attention, then every
        other setup field that differs from its default (:func:`setup_tags`), so two cases
        of one file never share a label."""
        s = self.setup or {}
        label = (f"{self.model} {s.get('mode', '?')} {s.get('precision', '?')} "
                 f"b{s.get('batch', '?')}x{s.get('seq', '?')} {s.get('attn', '?')}")
        label = " ".join([label, *setup_tags(s, self.backend)])
        return label + (f" [{self.backend}]" if backend else "")


_ABSENT = object()

#: The setup fields every label names in its head (model mode precision bBATCHxSEQ attn).
_LABEL_HEAD = frozenset({"mode", "precision", "batch", "seq", "attn"})

#: How a label writes a setup field that differs from its default; a field not named here
#: (a new one) is written ``name=value``, so a label never drops a difference.
_TAGS: dict[str, Callable[[Any], str]] = {
    "grad_ckpt": lambda v: "ckpt" if v else "no-ckpt",
    "optimizer": lambda v: "no-optimizer" if v == "none" else str(v),
    "optimizer_impl": lambda v: f"impl={v}",
    "quant": lambda v: str(v),
    "lora_rank": lambda v: f"r{v}",
    "lora_alpha": lambda v: f"alpha{v}",
    "lora_targets": lambda v: ",".join(v) if isinstance(v, list) else str(v),
    "world_size": lambda v: f"x{v}",
    "sharding": lambda v: str(v),
    "new_tokens": lambda v: f"+{v}tok",
    "loop": lambda v: f"{v}-loop",
    "grad_accum": lambda v: f"accum{v}",
    "keep_grads": lambda v: "keep-grads" if v else "no-keep-grads",
    "use_cache": lambda v: "use-cache" if v else "no-cache",
    "loss": lambda v: str(v),
    "trainer": lambda v: f"{v}-trainer",
    "ref_model": lambda v: f"ref-{v}",
    "packing": lambda v: str(v),
    "num_generations": lambda v: f"g{v}",
    "max_completion": lambda v: f"+{v}completion",
    "num_iterations": lambda v: f"mu{v}",
    "beta": lambda v: f"beta{v}",
    "versions": lambda v: ",".join(f"{k}={x}" for k, x in v) if isinstance(v, list) else str(v),
    "compute_capability": lambda v: f"cc{v}",
    "alloc_conf": lambda v: str(v),
    "empty_cache_steps": lambda v: f"empty-cache/{v}",
    "load": lambda v: f"load-{v}",
    "rope_scaling": lambda v: f"rope-x{v}",
    "allow_llama_fallback": lambda v: "llama-fallback" if v else "no-llama-fallback",
    "kbit_prep": lambda v: f"kbit-prep-{v}",
    "fsdp_wrap": lambda v: f"fsdp-wrap-{v}",
}


def setup_tags(setup: dict[str, Any], backend: str | None = None) -> list[str]:
    """One short tag per setup field that differs from ``Setup()``'s default, beyond the
    label's head; the device only where it is not the backend's own (cpu on the cpu
    backend, cuda on cuda and sim)."""
    from estimator.setup import Setup
    defaults = Setup().to_dict()
    defaults["device"] = "cpu" if backend == "cpu" else defaults["device"]
    tags = []
    for name, value in setup.items():
        if name in _LABEL_HEAD or value == defaults.get(name, _ABSENT) or value in (None, [], ""):
            continue
        tag = _TAGS.get(name)
        tags.append(tag(value) if tag else f"{name}={value}")
    return tags


@dataclass
class PhaseMeasure:
    """One phase's worst measured step. ``peak_allocated_bytes`` is
    ``torch.cuda.max_memory_allocated`` on cuda and the tracked live tensor bytes on cpu
    and sim; ``categories`` split the tracked bytes at the phase's peak."""

    peak_allocated_bytes: int
    peak_reserved_bytes: int | None
    tracked_peak_bytes: int
    start_bytes: int
    end_bytes: int
    categories: dict[str, int]
    untracked_bytes: int | None = None            # cuda: allocated beyond what the tracker saw
    memory_stats: dict[str, int] | None = None    # cuda: CUDACachingAllocator counters


@dataclass
class Measured:
    """What the run measured. Peaks are over every measured step; NVML figures are
    device-wide unless their name says process."""

    phases: dict[str, PhaseMeasure] = field(default_factory=dict)
    peak_phase: str | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    categories: dict[str, int] | None = None      # per category at the peak phase's peak
    end_bytes: int | None = None                  # Trainer steps: tracked bytes at the step's end
    nvml_idle_used_bytes: int | None = None       # device used before this process's context
    nvml_context_bytes: int | None = None         # what initialising CUDA added beyond reserved
    nvml_process_used_bytes: int | None = None    # this process, right after initialisation
    nvml_peak_used_bytes: int | None = None
    nvml_peak_process_bytes: int | None = None
    nvml_timeline: list[list[float]] | None = None  # (seconds, device used bytes)
    rss_before_bytes: int | None = None
    rss_peak_bytes: int | None = None
    tracked_live_storages_end: int | None = None
    timeline: list[list[int]] | None = None       # (allocation/free event, live bytes)
    timeline_phases: list[list[Any]] | None = None  # (phase, first event, last event) per measured phase
    analytic: dict[str, int] | None = None        # sim: non-tensor bytes added to every phase (cuBLAS workspaces)
    first_step: dict[str, PhaseMeasure] | None = None  # the first step's phases (steady state: ``phases``)


@dataclass
class Prediction:
    """``estimator.estimate.Estimate.to_dict()``: the estimate put beside the measurement."""

    model: str
    total_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    peak_phase: str
    params: int
    trainable_params: int
    param_groups: dict[str, int]
    components: dict[str, int]
    phases: dict[str, dict[str, int]]
    setup: dict[str, Any]
    overheads: str
    notes: list[str]
    calibration_key: str | None = None
    first_step: dict[str, Any] | None = None  # the first step, where it differs (Estimate.first_step_phases)
    reserved_phase: str | None = None  # where reserved memory peaks (the model's load: "load")
    non_tensor: dict[str, Any] | None = None  # memory outside the allocator by source (Estimate.non_tensor)
    load: dict[str, int] | None = None  # the load phase's categories (Estimate.load_phase)

    def phases_of(self, first_step: bool = False) -> dict[str, dict[str, int]]:
        """The predicted phases of the first step (where it differs) or of steady state."""
        if first_step and self.first_step and self.first_step.get("phases"):
            return self.first_step["phases"]
        return self.phases

    def tensors_at(self, phase: str | None, first_step: bool = False) -> dict[str, int]:
        """The predicted categories of ``phase`` (the peak phase's when it has none)."""
        phases = self.phases_of(first_step)
        if phase in phases:
            return dict(phases[phase])
        if first_step and phases is not self.phases:
            return dict(max(phases.values(), key=lambda c: sum(c.values())))
        return dict(self.components)


@dataclass
class Timings:
    build_s: float | None = None
    warmup_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    case_s: float | None = None                   # campaign: wall time from dispatch to record


@dataclass
class Record:
    case: Case
    case_key: str
    backend: str
    status: Status
    message: str = ""
    measured: Measured = field(default_factory=Measured)
    predicted: Prediction | None = None
    timings: Timings = field(default_factory=Timings)
    versions: dict[str, str] = field(default_factory=dict)
    device: dict[str, Any] | None = None
    host: str | None = None
    created: str | None = None
    rank: int | None = None
    world_size: int | None = None
    simulated: str | None = None                  # sim rank 0 of N: how it was simulated
    source: str | None = None                     # "trainer_callback" for Trainer steps
    step: int | None = None                       # Trainer steps: the global step
    first_step: bool | None = None                # Trainer steps: the run's first optimizer step
    campaign: dict[str, Any] | None = None        # campaign bookkeeping (worker, alone, seconds)
    isolation: dict[str, int] | None = None       # persistent workers: the before/after checks
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def label(self) -> str:
        return self.case.label()

    def fail(self, status: Status, message: str) -> None:
        self.status, self.message = status, message

    def note(self, text: str) -> None:
        """Add a sentence to the message without hiding what is there."""
        self.message = f"{self.message}; {text}" if self.message else text

    def to_json(self) -> dict[str, Any]:
        out = _encode(self)
        out.update(out.pop("extra", {}))
        return out


def new_record(case: Case, status: Status = Status.OK, message: str = "",
               predicted: Prediction | None = None, **fields: Any) -> Record:
    """The one record constructor: identity, versions, host and time filled in."""
    return Record(case=case, case_key=case.key, backend=case.backend, status=status, message=message,
                  predicted=predicted, versions=versions(), host=socket.gethostname(),
                  created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  **fields)


def versions() -> dict[str, str]:
    """Python and the libraries whose code decides what a step allocates (importlib.metadata:
    nothing is imported)."""
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ---------------------------------------------------------------------- checking
def check_record(obj: object, where: str) -> Record:
    """A JSON object as a :class:`Record`; :class:`RecordError` naming ``where`` and the key."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: a record must be a JSON object")
    missing = [k for k in ("schema", "case", "case_key", "status", "backend") if k not in obj]
    if missing:
        raise RecordError(f"{where}: record lacks {', '.join(missing)}")
    if obj["schema"] != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema {obj['schema']!r} is not {SCHEMA_VERSION}")
    record = _decode(Record, obj, where, "")
    if record.case.setup is None and record.source != "trainer_callback":
        raise RecordError(f"{where}: case.setup must be an object")
    return record


def _hints(cls: type) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type, dict[str, Any]] = {}


def _decode(tp: Any, value: Any, where: str, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        _check_free_form(value, where, path)
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecordError(f"{where}: {path or 'record'} must be an object")
        hints, kwargs, known = _hints(tp), {}, set()
        for f in dataclasses.fields(tp):
            if f.name == "extra":
                continue
            known.add(f.name)
            if f.name in value:
                kwargs[f.name] = _decode(hints[f.name], value[f.name], where, f"{path}.{f.name}".lstrip("."))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: {path or 'record'} lacks {f.name}")
        if "extra" in {f.name for f in dataclasses.fields(tp)}:
            kwargs["extra"] = {k: v for k, v in value.items() if k not in known}
            _check_free_form(kwargs["extra"], where, path)
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise RecordError(f"{where}: {path} {value!r} is not one of "
                              f"{', '.join(m.value for m in tp)}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: {path} must be an object")
        return {k: _decode(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: {path} must be a list")
        return [_decode(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            what = "an integer number of bytes" if path.endswith("_bytes") else "an integer"
            raise RecordError(f"{where}: {path} must be {what}, got {value!r}")
        return _not_negative(value, where, path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecordError(f"{where}: {path} must be a finite number, got {value!r}")
        return _not_negative(value, where, path)
    if tp is str:
        if not isinstance(value, str):
            raise RecordError(f"{where}: {path} must be a string, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecordError(f"{where}: {path} must be true or false, got {value!r}")
        return value
    return value


def _not_negative(value: int | float, where: str, path: str) -> int | float:
    if value < 0 and path.rsplit(".", 1)[-1] not in SIGNED_FIELDS:
        raise RecordError(f"{where}: {path} must not be negative, got {value!r}")
    return value


def _check_free_form(value: Any, where: str, path: str) -> None:
    """Free-form values (setup, device, campaign, the predicted first step): a ``*_bytes``
    key holds a non-negative integer, and so does every category of a ``phases`` object
    (phase -> category -> bytes)."""
    key = path.rsplit(".", 1)[-1]
    if key.endswith("_bytes") and value is not None:
        _decode(int, value, where, path)
    elif key == "phases" and isinstance(value, dict):
        _decode(dict[str, dict[str, int]], value, where, path)
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_free_form(item, where, f"{path}.{k}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_free_form(item, where, f"{path}[{i}]")


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and f.default is None:
                continue  # optional and absent: not written
            out[f.name] = _encode(value)
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


# ---------------------------------------------------------------------- files
#: Called with one sentence when a reader skips or a writer repairs something.
Warn = Callable[[str], None]


def _torn(line: bytes) -> bool:
    """An unterminated last line that is not one whole JSON value: a write cut short."""
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return True
    except RecursionError:  # whole, but too deep to read: the reader says so
        return False
    return False


def read_records(path: str | Path, allow_partial_tail: bool = False, warn: Warn | None = None) -> list[Record]:
    """All records of a JSONL file; a malformed line raises RecordError naming it.

    A last line without its newline is a record like any other when it is whole. When it
    is not (a write cut short), ``allow_partial_tail`` skips it, telling ``warn`` which
    line it was; otherwise it is an error naming the line."""
    path = Path(path)
    data = _read(path)
    lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        if number == len(lines) and _torn(raw):  # no newline after it: a write cut short
            if not allow_partial_tail:
                raise RecordError(f"{where}: an unfinished last record ({len(raw)} bytes without a newline, "
                                  f"a write cut short)")
            if warn:
                warn(f"{where}: skipped an unfinished last record ({len(raw)} bytes, a write cut short)")
            break
        try:
            obj = json.loads(raw.decode("utf-8"))
            out.append(check_record(obj, where))
        except UnicodeDecodeError:
            raise RecordError(f"{where}: not valid UTF-8") from None
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise RecordError(str(too_deep(where))) from None
    return out


def _read(path: Path) -> bytes:
    """A records file's bytes (:func:`estimator.files.read_input_bytes`: a regular file, not too large)."""
    try:
        return read_input_bytes(path, "records file")
    except ValueError as exc:
        raise RecordError(str(exc)) from None


def repair_tail(path: str | Path, warn: Warn | None = None) -> int:
    """Make the file end with a newline before a writer appends: a whole last record whose
    newline is missing gets it; an unfinished one (a write cut short) is cut off, and
    ``warn`` names its line. Returns the bytes cut."""
    path = _output(path)
    if not path.exists():
        return 0
    data = _read(path)
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    number = data.count(b"\n") + 1
    with open(path, "r+b") as fh:
        if _torn(tail) and tail.strip():
            fh.truncate(keep)
            if warn:
                warn(f"{path}, line {number}: removed an unfinished last record "
                     f"({len(tail)} bytes, a write cut short)")
        else:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")
            tail = b""
        fh.flush()
        os.fsync(fh.fileno())
    return len(tail)


@contextlib.contextmanager
def lock_records(path: str | Path, warn: Warn | None = None) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on a records file while appending to it, so
    a second sweep or campaign on the same file stops with a sentence instead of writing
    every case twice. Where the filesystem has no locks, ``warn`` says so and it goes on."""
    path = _output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "ab")
    except OSError as exc:
        raise RecordError(f"cannot open records file {path}: {exc.strerror}") from None
    try:
        try:
            import fcntl
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecordError(f"{path} is being written by another vramlab sweep or campaign (it holds the "
                              f"file's lock); wait for it to end or write to another file") from None
        except (ImportError, OSError) as exc:
            if warn:
                warn(f"cannot lock {path} ({getattr(exc, 'strerror', None) or exc}); make sure no other "
                     f"sweep writes to it")
        yield
    finally:
        fh.close()  # releases the lock


def append_record(path: str | Path, record: Record) -> None:
    """One line, one write, flushed and fsynced."""
    obj = record.to_json()
    check_record(obj, "record to write")
    line = json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
    path = _output(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _output(path: str | Path) -> Path:
    """A records file to append to: absent or a regular file (a FIFO would block the writer)."""
    try:
        return check_output_path(path, "records file")
    except ValueError as exc:
        raise RecordError(str(exc)) from None
