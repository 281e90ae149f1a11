"""Child processes of the profiler (sweep workers, campaign workers, torchrun ranks):
the checkout importable first, the user's current directory never, and no child
outliving its parent."""
from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

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


def die_with_parent(parent: int | None = None) -> None:
    """``preexec_fn`` on Linux: the child gets SIGKILL when its parent dies, however it
    dies (prctl PR_SET_PDEATHSIG), so a killed run leaves no child holding GPU memory.
    Given ``parent`` (the pid that started it: :func:`dies_with_this_process`), a child
    whose parent died between fork and prctl kills itself at once (prctl(2) names the race)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def dies_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for children that must not outlive this process, race included."""
    return functools.partial(die_with_parent, os.getpid())
