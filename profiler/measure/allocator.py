"""The sim's tensor trace replayed through the caching allocator's rules: what
``max_memory_allocated`` and ``max_memory_reserved`` would say for a CUDA-semantics sim
run. The rules themselves are torch-free and shared with the estimator
(estimator/allocator.py, cited to c10/cuda/CUDACachingAllocator.cpp); this module only reads
the tracker's event log.

Not modelled here: several streams (the tracker does not see them), and the order in
which a library's workspaces appear (the cuBLAS workspaces are placed first, in segments of
their own: at 32 MiB they are large requests rounded to 2 MiB and never share a segment).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from estimator.allocator import (  # noqa: F401  (the rules, re-exported for the profiler's callers)
    DEFAULT_CONF,
    AllocConf,
    CachingAllocator,
    allocation_size,
    round_size,
)

#: the allocator model under the name the sim's callers know
CachingAllocatorModel = CachingAllocator


def replay(events: Iterable[tuple], measured_meter: int, workspaces: Sequence[int] = (),
           conf: AllocConf = DEFAULT_CONF) -> dict[str, dict[str, int]]:
    """Replay a tracker's event log (``StorageTracker.events``): ``("a", key, nbytes)``,
    ``("f", key)`` and marks ``("m", label)``, where the harness marks
    ``("begin", meter id, phase)`` / ``("end", meter id, phase)`` around each phase (peaks
    reset at a begin, as the CUDA meter's ``reset_peak_memory_stats``) and
    ``"empty_cache"`` where the CUDA harness empties the cache. ``workspaces``: sizes of
    the cuBLAS workspaces, one per thread (the main one, autograd's), each allocated at the
    tracker's ``("matmul", thread)`` mark -- that thread's first cuBLAS call -- and kept.
    Returns, per phase of the meter ``measured_meter``, the worst step's peaks (by allocated
    bytes)."""
    model = CachingAllocator(conf)
    made: set[int] = set()
    out: dict[str, dict[str, int]] = {}
    for event in events:
        kind = event[0]
        if kind == "a":
            model.malloc(event[1], event[2])
        elif kind == "f":
            model.free(event[1])
        elif event[1] == "empty_cache":
            model.empty_cache()
        elif event[1][0] == "matmul":
            thread = event[1][1]
            if thread < len(workspaces) and thread not in made:
                made.add(thread)
                model.malloc(("workspace", thread), workspaces[thread])
        elif event[1][0] == "begin":
            model.reset_peaks()
        elif event[1][0] == "end" and event[1][1] == measured_meter:
            phase = event[1][2]
            if phase not in out or model.peak_allocated > out[phase]["allocated_bytes.all.peak"]:
                out[phase] = {"allocated_bytes.all.peak": model.peak_allocated,
                              "reserved_bytes.all.peak": model.peak_reserved,
                              "requested_bytes.all.peak": model.peak_requested,
                              "segment.all.current": model.segments}
    return out
