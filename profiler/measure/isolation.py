"""Many cases in one process, each as if it ran alone.

A fresh process per case pays imports and CUDA initialisation every time (10-15 s on a
GPU machine). A persistent worker pays them once, so it must prove, case by case, that
nothing of one case survives into the next:

- before each case: ``gc.collect``; on CUDA the cuBLAS/cuBLASLt workspaces are released
  (``torch._C._cuda_clearCublasWorkspaces``, torch/csrc/cuda/Module.cpp; the same call
  ``torch.cuda.graphs`` makes before capture), ``empty_cache`` and
  ``reset_peak_memory_stats``, so the case starts where a fresh process starts: nothing
  allocated; its own warm-up step creates the workspaces again, as a fresh process does;
- after each case: the same, then two checks. Every storage the case's tracker saw must
  be dead (a tensor kept alive past the case is a *leak*: the record becomes ``error``
  with the leaked bytes named, its measurements kept for inspection); and on CUDA
  ``memory_allocated()`` must be back at the value it had before the case (growth
  without a leaked tensor is a library allocation nobody releases). Either makes the
  worker *unclean*: the campaign replaces the process before the next case, so one bad
  case cannot move another case's peaks.

  One exception, seen on the first CUDA campaign (H200, torch 2.11): every case left
  exactly 512 bytes allocated with no tensor of it alive, a process-lifetime allocation
  some library makes once (512 B is the caching allocator's smallest block,
  c10/cuda/CUDACachingAllocator.cpp kMinBlockSize). Replacing the worker after every
  case cost a CUDA initialisation per case and serialised the campaign. So a process may
  keep up to ``PROCESS_RESIDUAL_LIMIT_BYTES`` in all: the record names the bytes
  (``isolation.residual_bytes``) and the worker stays. A fresh process makes the same
  allocation during its own case, so the next case's peak moves by at most that much
  (0 when the allocation comes before the peak, as a lazy initialisation does); the
  two-order tests check it to the byte.

On cpu and sim the tracker counts only storages it sees allocated (plus the weights it
is told about), so a leak from an earlier case cannot enter a later case's peaks; the
check still marks the leaking case.
"""
from __future__ import annotations

import gc

import torch

from estimator.modelspec import ModelSpec
from estimator.setup import Setup
from profiler.measure.run import run_case
from profiler.measure.tracker import StorageTracker
from profiler.record import Record, Status

#: What one worker process may keep allocated across cases with no tensor alive (see the
#: module docstring): 1 MiB, under 0.1 % of the smallest CUDA peak in the standard matrix.
PROCESS_RESIDUAL_LIMIT_BYTES = 1 << 20


def settle(cuda: bool) -> int:
    """Free what is free; on CUDA give cached blocks and library workspaces back and reset
    the peak counters. Returns the bytes still allocated (0 on cpu/sim)."""
    gc.collect()
    if not cuda:
        return 0
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def run_isolated(model: str, setup: Setup, backend: str, steps: int = 2, timeline: bool = False,
                 cuda_context: dict | None = None, spec: ModelSpec | None = None) -> tuple[Record, bool]:
    """Run one case in this process between two settles; returns (record, clean).

    ``clean`` is False when the case left anything behind (a leaked tensor, or CUDA
    memory still allocated that was not before): the caller must not run another case in
    this process if it wants that case's peaks to be its own."""
    cuda = backend == "cuda"
    before = settle(cuda)
    tracker = StorageTracker(record_timeline=timeline)
    record = run_case(model, setup, backend, steps=steps, timeline=timeline, tracker=tracker,
                      cuda_context=cuda_context, spec=spec)
    after = settle(cuda)
    res = tracker.results()
    leaked_bytes, leaked_storages = int(res.current_bytes), int(res.live_storages)
    del tracker, res
    growth = after - before
    record.isolation = {"allocated_before_bytes": before, "allocated_after_bytes": after,
                        "leaked_bytes": leaked_bytes, "leaked_storages": leaked_storages}
    if leaked_storages:
        note = (f"leak: {leaked_bytes} bytes in {leaked_storages} tensor storages made by this case "
                f"were still alive after it ended; its measurements are kept but not trusted")
        record.fail(Status.ERROR, f"{note}; {record.message}" if record.message else note)
    kept = 0 < growth and after <= PROCESS_RESIDUAL_LIMIT_BYTES
    if kept:
        record.isolation["residual_bytes"] = growth
        record.note(f"{growth} bytes stayed allocated after the case with no tensor of it alive "
                    f"(a process-lifetime library allocation; the process keeps {after} bytes in all, "
                    f"within {PROCESS_RESIDUAL_LIMIT_BYTES} bytes)")
    elif growth > 0:
        record.note(f"{growth} bytes stayed allocated after the case with no tensor of it alive "
                    f"(a library allocation); the worker is replaced before the next case")
    return record, not leaked_storages and (growth <= 0 or kept)
