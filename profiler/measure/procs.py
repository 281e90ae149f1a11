"""Child processes of the profiler (sweep workers, campaign workers, torchrun ranks):
the checkout importable first, and no child outliving its parent."""
from __future__ import annotations

import os
import signal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checkout_env() -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, so a child imports
    the same estimator and profiler (the repo need not be pip-installed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def die_with_parent() -> None:
    """``preexec_fn`` on Linux: the child gets SIGKILL when its parent dies, however it
    dies (prctl PR_SET_PDEATHSIG), so a killed run leaves no child holding GPU memory."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except Exception:
        pass
