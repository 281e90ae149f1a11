"""torchrun under a keeper that cleans up after it, however the run ends.

``python -P -m profiler.measure.launcher '<request json>' NPROC``

:func:`profiler.measure.distributed.run_distributed` starts the keeper in a session of its
own with SIGTERM as its parent-death signal. The keeper makes the run's temporary folder
(``vramlab-dist-*``), starts torchrun in a session of its own (parent-death signal SIGTERM:
torchrun then stops its ranks, whose own parent-death signal is SIGKILL), waits for it
and prints one JSON line on stdout: torchrun's exit code and the text of every file the
ranks left in the folder. SIGTERM, SIGHUP or SIGINT -- its parent stopping it, or dying --
stop torchrun's group (:data:`~profiler.measure.procs.STOP_GRACE_S`, then SIGKILL), and
what the ranks left is printed all the same. The folder is removed in ``finally``.
torchrun's stderr is the keeper's (the parent reads torchrun's failure summary in it);
its stdout is dropped (rank 0 repeats the records there). Imports no torch.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from profiler.measure.procs import Stopped, python_command, signals_held, signals_raise, start_group, stop_group

#: The file rank 0 writes the gathered records to; each rank writes ``<it>.rank<r>`` first.
RECORDS_NAME = "records.jsonl"


def launch_command(request: dict, nproc: int) -> list[str]:
    """PyTorch's launcher (``torchrun``) running :mod:`profiler.measure.dist_worker` on ``nproc``
    ranks; each rank is this interpreter with ``-P`` (:func:`profiler.measure.procs.python_command`;
    ``--no-python`` lets us name it, torchrun's ``-m`` would run ``python -u -m``)."""
    return python_command("torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--no-python",
                          *python_command("profiler.measure.dist_worker", json.dumps(request, sort_keys=True)))


def keep(request: dict, nproc: int) -> int:
    """Run torchrun on ``request`` (without ``out``: the keeper's folder holds the records)."""
    folder, proc, returncode = None, None, None
    with signals_raise((signal.SIGTERM, signal.SIGHUP, signal.SIGINT)):
        try:
            folder = Path(tempfile.mkdtemp(prefix="vramlab-dist-"))
            request = dict(request, out=str(folder / RECORDS_NAME))
            proc = start_group(launch_command(request, nproc), stdout=subprocess.DEVNULL)
            returncode = proc.wait()
        except Stopped as stopped:
            returncode = 128 + stopped.signum
        finally:
            with signals_held():  # a second signal waits until the folder is gone
                if proc is not None and proc.poll() is None:
                    stop_group(proc)
                if folder is not None:
                    _relay(folder, returncode)
                    shutil.rmtree(folder, ignore_errors=True)
    return 0


def _relay(folder: Path, returncode: int | None) -> None:
    """One line: torchrun's exit code and every file the ranks left (nobody may read it)."""
    files = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.iterdir())
             if p.is_file()}
    try:
        sys.stdout.write(json.dumps({"returncode": returncode, "files": files}) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):  # the parent is gone: the folder still goes
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m profiler.measure.launcher '<json request>' NPROC\n")
        return 2
    try:
        return keep(json.loads(argv[0]), int(argv[1]))
    except Stopped as stopped:  # signalled again while cleaning up: the cleanup finished first
        return 128 + stopped.signum


if __name__ == "__main__":
    sys.exit(main())
