"""PyTorch's CUDA caching allocator, replayed: what ``max_memory_allocated`` and
``max_memory_reserved`` say for a sequence of tensor allocations and frees.

Why: the allocator counts whole blocks, not requested bytes. A request served from a free
cached block at most 1 MiB larger is handed out unsplit and counted whole, so
``max_memory_allocated`` sits above the bytes tensors asked for (``requested_bytes``) by
the remainders; ``max_memory_reserved`` is the segments obtained with cudaMalloc. On the
first CUDA campaign (H200, results/cuda/h200) that slack was 0-353 MiB at the peak and the
estimator's reserved model was off by up to 19 %; the sim's tensor trace replayed through
these rules matches both (tests/test_allocator.py).

The rules, from c10/cuda/CUDACachingAllocator.cpp (torch 2.x, default configuration:
no ``max_split_size_mb``, no ``roundup_power2_divisions``, no expandable segments):

- ``round_size``: requests round up to a multiple of kMinBlockSize = 512 bytes;
- pools: requests <= kSmallSize = 1 MiB come from the small pool, the rest from the large;
- ``get_allocation_size``: a new small segment is kSmallBuffer = 2 MiB; a large request
  under kMinLargeAlloc = 10 MiB gets a kLargeBuffer = 20 MiB segment; larger ones are
  rounded up to kRoundLarge = 2 MiB;
- ``get_free_block``: the smallest cached block of the pool that fits (ordered by
  (stream, size, address)); one stream here;
- ``should_split``: the remainder becomes a free block if it is >= 512 bytes (small pool)
  or > 1 MiB (large pool); otherwise the whole block is allocated and counted;
- ``free_block``: a freed block merges with free neighbours of its segment;
- ``empty_cache`` (``release_cached_blocks``) returns every segment that is wholly free.

Not modelled: several streams, allocation retries after a failed cudaMalloc (the replay
has no card size), graph pools, and the order in which a library's workspaces appear (the
cuBLAS workspaces are placed first, in segments of their own: at 32 MiB they are large
requests rounded to 2 MiB and never share a segment).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from estimator.units import MiB

K_MIN_BLOCK_SIZE = 512          # kMinBlockSize: every block is a multiple of this
K_SMALL_SIZE = 1 * MiB          # kSmallSize: largest small-pool request; large-pool split threshold
K_SMALL_BUFFER = 2 * MiB        # kSmallBuffer: a small-pool segment
K_LARGE_BUFFER = 20 * MiB       # kLargeBuffer: the segment for large requests under kMinLargeAlloc
K_MIN_LARGE_ALLOC = 10 * MiB    # kMinLargeAlloc
K_ROUND_LARGE = 2 * MiB         # kRoundLarge: large segments round up to this


def round_size(n: int) -> int:
    return K_MIN_BLOCK_SIZE if n < K_MIN_BLOCK_SIZE else K_MIN_BLOCK_SIZE * -(-n // K_MIN_BLOCK_SIZE)


def allocation_size(n: int) -> int:
    if n <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if n < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-n // K_ROUND_LARGE)


class _Block:
    __slots__ = ("address", "size", "allocated", "prev", "next", "small", "requested")

    def __init__(self, address: int, size: int, small: bool):
        self.address, self.size, self.small = address, size, small
        self.allocated, self.prev, self.next, self.requested = False, None, None, 0


class CachingAllocatorModel:
    """One device, one stream. ``malloc(key, nbytes)`` / ``free(key)``; byte counters
    and their peaks as ``torch.cuda.memory_stats`` names them."""

    def __init__(self) -> None:
        self._pools: dict[bool, list] = {True: [], False: []}  # sorted (size, address, block)
        self._live: dict = {}
        self._next_address = 0
        self.allocated = self.reserved = self.requested = self.segments = 0
        self.peak_allocated = self.peak_reserved = self.peak_requested = 0

    def _insert(self, b: _Block) -> None:
        bisect.insort(self._pools[b.small], (b.size, b.address, b))

    def _remove(self, b: _Block) -> None:
        pool = self._pools[b.small]
        del pool[bisect.bisect_left(pool, (b.size, b.address))]

    def malloc(self, key, nbytes: int) -> None:
        size = round_size(nbytes)
        small = size <= K_SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:  # cudaMalloc a new segment
            seg = allocation_size(size)
            block = _Block(self._next_address, seg, small)
            self._next_address += seg
            self.reserved += seg
            self.segments += 1
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if remaining >= K_MIN_BLOCK_SIZE if small else remaining > K_SMALL_SIZE:
            rest = _Block(block.address + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.allocated, block.requested = True, nbytes
        self.allocated += block.size
        self.requested += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_requested = max(self.peak_requested, self.requested)
        self._live[key] = block

    def free(self, key) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return  # allocated before the replay began
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._remove(prev)
            block.address, block.size, block.prev = prev.address, prev.size + block.size, prev.prev
            if prev.prev is not None:
                prev.prev.next = block
        if nxt is not None and not nxt.allocated:
            self._remove(nxt)
            block.size, block.next = block.size + nxt.size, nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        self._insert(block)

    def empty_cache(self) -> None:
        for small, pool in self._pools.items():
            kept = []
            for entry in pool:
                b = entry[2]
                if b.prev is None and b.next is None:
                    self.reserved -= b.size
                    self.segments -= 1
                else:
                    kept.append(entry)
            self._pools[small] = kept

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved, self.peak_requested = self.allocated, self.reserved, self.requested


def replay(events: Iterable[tuple], measured_meter: int, workspaces: Sequence[int] = ()) -> dict[str, dict[str, int]]:
    """Replay a tracker's event log (``StorageTracker.events``): ``("a", key, nbytes)``,
    ``("f", key)`` and marks ``("m", label)``, where the harness marks
    ``("begin", meter id, phase)`` / ``("end", meter id, phase)`` around each phase (peaks
    reset at a begin, as the CUDA meter's ``reset_peak_memory_stats``) and
    ``"empty_cache"`` where the CUDA harness empties the cache. ``workspaces``: sizes of
    non-tensor allocations alive throughout (the cuBLAS workspaces). Returns, per phase of
    the meter ``measured_meter``, the worst step's peaks (by allocated bytes)."""
    model = CachingAllocatorModel()
    for i, size in enumerate(workspaces):
        model.malloc(("workspace", i), size)
    out: dict[str, dict[str, int]] = {}
    for event in events:
        kind = event[0]
        if kind == "a":
            model.malloc(event[1], event[2])
        elif kind == "f":
            model.free(event[1])
        elif event[1] == "empty_cache":
            model.empty_cache()
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
