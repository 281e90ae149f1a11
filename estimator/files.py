"""The files a user hands us and the files we write back, one way each.

Reading: every path a user names (records, calibrations, matrices, baselines, the
published measurements) goes through :func:`read_input_bytes`: a regular file only -- a
FIFO would block forever and a character device such as ``/dev/zero`` never ends -- and
no larger than :data:`MAX_INPUT_BYTES`; what is wrong is a ``ValueError`` naming the file.
JSON and TOML documents are parsed by :func:`read_document`. Plain data only: no pickle,
nothing executed.

Writing: an output that replaces a file (a calibration, a report, a summary) is written
by :func:`write_atomic`: a temporary file in the same folder, flushed and fsynced, then
``os.replace``d over the old one, so a full disk or a kill mid-write leaves the previous
file whole.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any

from .units import GiB, format_bytes

#: The largest file read whole. The committed inputs are at most 1.1 MB
#: (results/published/records.jsonl); a record is at most ~0.3 MB (its tracker timeline
#: holds at most 10,000 points, profiler/measure/tracker.py DEFAULT_MAX_TIMELINE_POINTS, and
#: its NVML timeline 2,000, profiler/measure/nvml.py MAX_TIMELINE_POINTS), so 1 GiB holds
#: thousands of the largest records and stops a wrong file before it fills the memory.
MAX_INPUT_BYTES = 1 * GiB

#: What ``stat`` calls each kind of file that is not a regular one.
_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"))


def _kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _refuse(path: Path, what: str, mode: int) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise ValueError(f"{what} {path} is a {kind}, not a regular file; name a file")


def read_input_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of the regular file ``path``; ``what`` names it in the error ("records
    file", "calibration"). Special files are refused before they are opened for reading
    (``stat``), and again on the opened descriptor (``fstat``), so none is ever read."""
    path = Path(path)
    try:
        _refuse(path, what, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put in its place opens without blocking
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        _refuse(path, what, info.st_mode)
        if info.st_size > MAX_INPUT_BYTES:
            raise ValueError(f"{what} {path} holds {info.st_size} bytes, more than the {format_bytes(MAX_INPUT_BYTES)} "
                             f"a file read whole may hold (estimator/files.py MAX_INPUT_BYTES); split it")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(MAX_INPUT_BYTES + 1)  # it may grow while read
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"{what} {path} grew past {format_bytes(MAX_INPUT_BYTES)} while it was read; split it")
    return data


def check_output_path(path: str | Path, what: str) -> Path:
    """``path`` if it is absent or a regular file: a FIFO or a device named as an output
    would block the writer or swallow the data (``/dev/full``)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise ValueError(f"cannot write {what} {path}: {exc.strerror}") from None
    _refuse(path, what, mode)
    return path


def make_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder, made with its parents where absent; a file, a device or a FIFO
    already there is refused with a sentence (``mkdir`` would say only "File exists")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{what} {path} exists and is not a folder; name a folder") from None
    except OSError as exc:
        raise ValueError(f"cannot make {what} {path}: {exc.strerror}") from None
    return path


def write_atomic(path: str | Path, data: str | bytes, what: str) -> Path:
    """Replace ``path`` with ``data`` (text is UTF-8) all at once: written to a temporary
    file beside it, flushed and fsynced, then renamed over it (``os.replace`` is atomic
    within a filesystem, POSIX rename(2)). The new file keeps the old one's permissions.
    A failed write leaves the old file as it was, and no temporary file."""
    path = check_output_path(path, what)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(f"cannot write {what} {path}: {exc.strerror}") from None
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                if path.exists():
                    os.fchmod(fh.fileno(), stat.S_IMODE(os.stat(path).st_mode))
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise OSError(f"cannot write {what} {path}: {exc.strerror or exc}; the previous {path.name} "
                          f"is unchanged") from None
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone once renamed
            tmp.unlink()
    return path


def too_deep(where: str) -> ValueError:
    """The error for JSON or TOML nested deeper than Python's parsers recurse."""
    return ValueError(f"{where} nests objects or lists deeper than {sys.getrecursionlimit()} levels "
                      f"(Python's recursion limit); no vramlab file is nested that deep")


def read_document(path: str | Path, what: str, fmt: str = "json") -> Any:
    """The parsed content of a JSON (``fmt="json"``) or TOML (``fmt="toml"``) file.
    ``what`` names the document in the error ("calibration", "matrix")."""
    path = Path(path)
    try:
        text = read_input_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid TOML ({exc})") from None
    except RecursionError:
        raise too_deep(f"{what} {path}") from None
