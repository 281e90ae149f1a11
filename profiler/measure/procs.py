"""Child processes of the profiler (sweep workers, campaign workers, torchrun ranks):
the checkout importable first, the user's current directory never, and no child
outliving its parent."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: Where every child starts: the checkout, never the user's current directory, whose
#: ``json.py`` or ``estimator/`` a child would otherwise import (``python -m`` puts the
#: current directory first on sys.path).
CHILD_CWD = str(ROOT)


def python_command(module: str, *args: str) -> list[str]:
    """This interpreter running ``module`` with ``-P`` (Python 3.11+: nothing prepended to
    sys.path, neither the current directory nor a script's folder); the checkout comes
    from :func:`checkout_env`'s PYTHONPATH. Start it with ``cwd=CHILD_CWD`` too, so a
    relative entry in the user's PYTHONPATH cannot reach back to their directory."""
    return [sys.executable, "-P", "-m", module, *args]


def checkout_env() -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, so a child imports
    the same estimator and profiler (the repo need not be pip-installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


#: prctl(2) option: the signal this process gets when its parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: Seconds a stopped process group gets between SIGTERM and SIGKILL: torchrun's agent
#: SIGTERMs its ranks and waits for them (torch/distributed/elastic/multiprocessing/api.py
#: ``PContext.close``); ranks that do not handle SIGTERM end within a second of it.
STOP_GRACE_S = 10.0


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """``preexec_fn`` on Linux (or the first thing a child does): this process gets ``sig``
    when its parent dies, however it dies (prctl PR_SET_PDEATHSIG), so a killed run leaves
    no child holding GPU memory. SIGKILL by default; SIGTERM for a child that must clean up
    after itself (the launcher's temporary folder, torchrun's ranks). Given ``parent`` (the
    pid that started it: :func:`dies_with_this_process`), a child whose parent died between
    fork and prctl gets ``sig`` at once (prctl(2) names the race). Elsewhere: no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except Exception:
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def dies_with_this_process(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for children that must not outlive this process, race included.
    (PR_SET_PDEATHSIG follows the thread that forks: start such children from a thread that
    lives as long as they should, as the main thread does.)"""
    return functools.partial(die_with_parent, os.getpid(), sig)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is, so ``finally`` blocks run (their
    default action ends the process at once); the CLI exits 130 as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def signals_raise(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While inside, ``signals`` raise :class:`Stopped` (Ctrl-C raises KeyboardInterrupt
    already). Only the main thread may set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_stopped) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_held(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """``signals`` wait until the block ends (a second Ctrl-C cannot cut a cleanup short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_group(command: list[str], **popen: Any) -> subprocess.Popen:
    """``command`` in a session (and process group) of its own, from the checkout, with
    SIGTERM as its parent-death signal: it cleans up after itself when this process dies,
    and :func:`stop_group` ends it with whatever it started in its group."""
    return subprocess.Popen(command, cwd=CHILD_CWD, env=checkout_env(), start_new_session=True,
                            preexec_fn=dies_with_this_process(signal.SIGTERM), **popen)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> tuple[str | bytes | None, ...]:
    """End ``proc`` and its process group (started with ``start_new_session``): SIGTERM,
    ``grace_s`` seconds to go, then SIGKILL. Its pipes are drained meanwhile (a child
    blocked on a full stderr pipe could not end); returns (stdout, stderr) as far as read."""
    out: tuple[str | bytes | None, ...] = (None, None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:  # a grandchild holding the pipe open, or a slow exit
            continue
        except ValueError:  # the pipes were read to the end already
            return out
    return out
