"""PyTorch's CUDA caching allocator as pure rules: what ``max_memory_allocated`` and
``max_memory_reserved`` say for a sequence of allocations and frees. No torch: the
estimator replays its own allocation sequence through it (estimator/allocations.py) and
the sim replays the tensor trace it tracked (profiler/measure/allocator.py).

Why: the allocator counts blocks and segments, not requested bytes. A request served from
a cached block at most 1 MiB larger is handed out unsplit and counted whole, so
``max_memory_allocated`` sits above the bytes tensors asked for; ``max_memory_reserved`` is
every segment obtained with cudaMalloc (or mapped, with expandable segments), used or
cached, and it -- plus the memory outside the allocator -- is what runs out.

The rules, from c10/cuda/CUDACachingAllocator.cpp (torch 2.4-2.13; read at pytorch/pytorch
commit 001074d, the functions named below):

- ``round_size``: requests round up to a multiple of kMinBlockSize = 512 bytes;
- ``get_pool``: requests <= kSmallSize = 1 MiB come from the small pool, the rest from the
  large; every stream has its own pools (``BlockComparatorSize`` orders blocks by stream
  first, ``get_free_block`` stops at the end of the request's stream);
- ``get_allocation_size``: a new small segment is kSmallBuffer = 2 MiB; a large request
  under kMinLargeAlloc = 10 MiB gets a kLargeBuffer = 20 MiB segment; larger ones are
  rounded up to kRoundLarge = 2 MiB;
- ``get_free_block``: the smallest cached block of the stream's pool that fits (ordered by
  size, then address); with ``max_split_size_mb`` a request under it never takes a block at
  or over it, and a request over it takes one only if the block is under request + 20 MiB;
- ``should_split``: the remainder becomes a free block if it is >= 512 bytes (small pool, or
  any pool with expandable segments) or > 1 MiB (large pool, request under
  ``max_split_size``); otherwise the whole block is allocated and counted;
- ``free_block``: a freed block merges with free neighbours of its segment;
- ``alloc_block`` / ``release_available_cached_blocks`` / ``release_cached_blocks``: with a
  card size (``capacity_bytes``), a cudaMalloc that does not fit first frees cached oversize
  blocks (``max_split_size_mb`` only), then every wholly free segment, and retries
  (``num_alloc_retries``); what still does not fit is out of memory (``num_ooms``);
- ``empty_cache`` (``release_cached_blocks``) returns every segment that is wholly free;
- expandable segments (Note [Expandable Segments], ``ExpandableSegment``,
  ``find_expandable_block``, ``try_allocate_expandable_block``, ``unmap_block``): one
  segment per stream and pool, grown by mapping pages of 2 MiB (small pool) or 20 MiB
  (large pool) at the lowest address where free space plus unmapped pages fit the request;
  a free block that could grow into unmapped pages is chosen last; ``empty_cache`` unmaps
  the whole pages of free blocks.

Not modelled: graph pools, ``roundup_power2_divisions``, ``garbage_collection_threshold``,
blocks held by cross-stream events (``record_stream``): a block freed on one stream is
reusable at once on its own stream.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .units import MiB

K_MIN_BLOCK_SIZE = 512          # kMinBlockSize: every block is a multiple of this
K_SMALL_SIZE = 1 * MiB          # kSmallSize: largest small-pool request; large-pool split threshold
K_SMALL_BUFFER = 2 * MiB        # kSmallBuffer: a small-pool segment (and expandable small page)
K_LARGE_BUFFER = 20 * MiB       # kLargeBuffer: the segment for 1-10 MiB requests (and expandable large page)
K_MIN_LARGE_ALLOC = 10 * MiB    # kMinLargeAlloc
K_ROUND_LARGE = 2 * MiB         # kRoundLarge: large segments round up to this
#: CUDAAllocatorConfig::parseMaxSplitSize (c10/cuda/CUDAAllocatorConfig.cpp): the option must
#: be above kLargeBuffer / 1 MiB = 20
MIN_MAX_SPLIT_SIZE_MB = K_LARGE_BUFFER // MiB
#: ``PYTORCH_CUDA_ALLOC_CONF`` keys this model reads
ALLOC_CONF_KEYS = ("expandable_segments", "max_split_size_mb")


@dataclass(frozen=True)
class AllocConf:
    """The caching allocator's settings (``PYTORCH_CUDA_ALLOC_CONF``) that change reserved
    memory: ``expandable_segments:True`` and ``max_split_size_mb:N``."""

    expandable_segments: bool = False
    max_split_size_bytes: int | None = None  # None: unlimited (the default, SIZE_MAX)

    def __post_init__(self) -> None:
        if not isinstance(self.expandable_segments, bool):
            raise ValueError(f"expandable_segments must be True or False, got {self.expandable_segments!r}")
        m = self.max_split_size_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m <= K_LARGE_BUFFER):
            raise ValueError(f"max_split_size must be over {MIN_MAX_SPLIT_SIZE_MB} MiB, got {m!r} bytes")

    @classmethod
    def parse(cls, text: str) -> AllocConf:
        """``"expandable_segments:True,max_split_size_mb:128"`` (``PYTORCH_CUDA_ALLOC_CONF``'s
        syntax, c10/cuda/CUDAAllocatorConfig.cpp ``parseArgs``); "" is the default."""
        expandable, max_split = False, None
        for item in str(text or "").split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = (part.strip() for part in item.partition(":"))
            if not sep or not value:
                raise ValueError(f"alloc-conf entries are key:value, got {item!r}")
            if key == "expandable_segments":
                if value not in ("True", "False"):
                    raise ValueError(f"expandable_segments takes True or False, got {value!r}")
                expandable = value == "True"
            elif key == "max_split_size_mb":
                if not value.isdigit() or int(value) <= MIN_MAX_SPLIT_SIZE_MB:
                    raise ValueError(f"max_split_size_mb must be an integer over {MIN_MAX_SPLIT_SIZE_MB}, "
                                     f"got {value!r}")
                max_split = int(value) * MiB
            else:
                raise ValueError(f"alloc-conf key {key!r} is not modelled; modelled: {', '.join(ALLOC_CONF_KEYS)}")
        return cls(expandable, max_split)

    def __str__(self) -> str:
        """The canonical ``PYTORCH_CUDA_ALLOC_CONF`` text ("" for the default)."""
        parts = ["expandable_segments:True"] if self.expandable_segments else []
        if self.max_split_size_bytes is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size_bytes // MiB}")
        return ",".join(parts)


DEFAULT_CONF = AllocConf()


def round_size(n: int) -> int:
    return K_MIN_BLOCK_SIZE if n < K_MIN_BLOCK_SIZE else K_MIN_BLOCK_SIZE * -(-n // K_MIN_BLOCK_SIZE)


def allocation_size(n: int) -> int:
    """The segment a cudaMalloc gets for a rounded request of ``n`` bytes."""
    if n <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if n < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return K_ROUND_LARGE * -(-n // K_ROUND_LARGE)


class _Block:
    __slots__ = ("address", "size", "allocated", "prev", "next", "pool", "requested", "mapped", "segment")

    def __init__(self, address: int, size: int, pool: tuple, segment):
        self.address, self.size, self.pool, self.segment = address, size, pool, segment
        self.allocated, self.prev, self.next, self.requested, self.mapped = False, None, None, 0, True


class _Expandable:
    """One expandable segment (a stream's pool): its page size, its first block and its
    unmapped ranges in address order."""

    __slots__ = ("page", "head", "unmapped")

    def __init__(self, page: int):
        self.page, self.head, self.unmapped = page, None, []

    def rescan(self) -> None:
        self.unmapped = []
        b = self.head
        while b is not None:
            if not b.mapped:
                self.unmapped.append(b)
            b = b.next


#: address space of one expandable segment: far beyond any card (the allocator reserves
#: 1 1/8 of the card's memory, ExpandableSegment's constructor)
_EXPANDABLE_SPAN = 1 << 50


class CachingAllocator:
    """One device: per-stream small and large pools. ``malloc(key, nbytes, stream)`` /
    ``free(key)`` / ``empty_cache()``; byte counters and their peaks as
    ``torch.cuda.memory_stats`` names them. With ``capacity_bytes`` (what the allocator may
    reserve: the card less what lives outside it) a cudaMalloc that does not fit frees
    cached segments and retries, and a request that still does not fit sets ``oom`` and
    returns False."""

    def __init__(self, conf: AllocConf = DEFAULT_CONF, capacity_bytes: int | None = None) -> None:
        self.conf = conf
        self.capacity = capacity_bytes
        self._pools: dict[tuple, list] = {}  # (stream, small) -> sorted [(size, address, block)]
        self._live: dict = {}
        self._expandable: dict[tuple, _Expandable] = {}
        self._next_address = 0
        self.allocated = self.reserved = self.requested = self.segments = 0
        self.peak_allocated = self.peak_reserved = self.peak_requested = 0
        self.num_alloc_retries = self.num_ooms = 0
        self.oom = False
        ms = conf.max_split_size_bytes
        self._max_split = ms if ms is not None else 1 << 62
        self._plain = ms is None and not conf.expandable_segments

    # ------------------------------------------------------------------ pools
    def _pool(self, key: tuple) -> list:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = []
        return pool

    def _insert(self, b: _Block) -> None:
        bisect.insort(self._pool(b.pool), (b.size, b.address, b))

    def _remove(self, b: _Block) -> None:
        pool = self._pools[b.pool]
        del pool[bisect.bisect_left(pool, (b.size, b.address))]

    def _free_block(self, size: int, pool_key: tuple) -> _Block | None:
        """``get_free_block``: the best fit of the stream's pool, or None."""
        pool = self._pools.get(pool_key)
        if not pool:
            return None
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        block = pool[i][2]
        if block.segment is not None:
            # expandable: a block that can grow into unmapped pages counts at that size
            grow = lambda b: b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)  # noqa: E731
            while i + 1 < len(pool) and grow(pool[i + 1][2]) < grow(block):
                i += 1
                block = pool[i][2]
        ms = self._max_split
        if size < ms <= block.size or (size >= ms and block.size >= size + K_LARGE_BUFFER):
            return None  # max_split_size: no oversize block for this request
        del pool[i]
        return block

    # ------------------------------------------------------------------ malloc / free
    def malloc(self, key, nbytes: int, stream: int = 0) -> bool:
        size = K_MIN_BLOCK_SIZE if nbytes < K_MIN_BLOCK_SIZE else K_MIN_BLOCK_SIZE * -(-nbytes // K_MIN_BLOCK_SIZE)
        small = size <= K_SMALL_SIZE
        pool_key = (stream, small)
        if self._plain:  # the default configuration: get_free_block's best fit, inline
            pool = self._pools.get(pool_key)
            block = None
            if pool:
                i = bisect.bisect_left(pool, (size, -1))
                if i < len(pool):
                    block = pool.pop(i)[2]
        else:
            block = self._free_block(size, pool_key)
        if block is None:
            block = self._new_block(size, pool_key)
            if block is None:
                self.oom = True
                self.num_ooms += 1
                return False
        remaining = block.size - size
        if small or block.segment is not None:
            split = remaining >= K_MIN_BLOCK_SIZE
        else:
            split = remaining > K_SMALL_SIZE and size < self._max_split
        if split:
            rest = _Block(block.address + size, remaining, pool_key, block.segment)
            nxt = block.next
            rest.prev, rest.next = block, nxt
            if nxt is not None:
                nxt.prev = rest
            block.next, block.size = rest, size
            pool = self._pools.get(pool_key)
            if pool is None:
                pool = self._pools[pool_key] = []
            bisect.insort(pool, (remaining, rest.address, rest))
        block.allocated, block.requested = True, nbytes
        allocated = self.allocated = self.allocated + block.size
        requested = self.requested = self.requested + nbytes
        if allocated > self.peak_allocated:
            self.peak_allocated = allocated
        if requested > self.peak_requested:
            self.peak_requested = requested
        self._live[key] = block
        return True

    def _new_block(self, size: int, pool_key: tuple) -> _Block | None:
        """``alloc_block``, and with a card size its retries: free cached oversize blocks
        (``release_available_cached_blocks``), then every wholly free segment
        (``release_cached_blocks``), allocating again after each."""
        block = self._alloc(size, pool_key)
        if block is None and self.capacity is not None:
            if self.conf.max_split_size_bytes is not None and self._release_oversize(size, pool_key):
                block = self._alloc(size, pool_key)
            if block is None:
                self.empty_cache()
                self.num_alloc_retries += 1
                block = self._alloc(size, pool_key)
        return block

    def _alloc(self, size: int, pool_key: tuple) -> _Block | None:
        return self._expand(size, pool_key) if self.conf.expandable_segments else self._cuda_malloc(size, pool_key)

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _cuda_malloc(self, size: int, pool_key: tuple) -> _Block | None:
        seg = allocation_size(size)
        if not self._fits(seg):
            return None
        block = _Block(self._next_address, seg, pool_key, None)
        self._next_address += seg
        self._grow(seg)
        self.segments += 1
        return block

    def _grow(self, nbytes: int) -> None:
        self.reserved += nbytes
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _release_oversize(self, size: int, pool_key: tuple) -> bool:
        """``release_available_cached_blocks``: free wholly free oversize blocks, the
        smallest one large enough, else the largest ones until ``size`` is covered."""
        pool = self._pools.get(pool_key) or []
        oversize = [e for e in pool if e[2].size >= self._max_split and e[2].prev is None and e[2].next is None]
        if not oversize:
            return False
        need = max(size, self._max_split)
        fit = [e for e in oversize if e[0] >= need]
        chosen = fit[:1] if fit else []
        if not chosen:
            total = 0
            for e in reversed(oversize):
                chosen.append(e)
                total += e[0]
                if total >= need:
                    break
            if total < need:
                return False
        for e in chosen:
            self._remove(e[2])
            self.reserved -= e[2].size
            self.segments -= 1
        return True

    def free(self, key) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return  # allocated before the replay began
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        block.requested = 0
        self._merge_and_insert(block)

    def _merge_and_insert(self, block: _Block) -> None:
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated and prev.mapped:
            self._remove(prev)
            block.address, block.size, block.prev = prev.address, prev.size + block.size, prev.prev
            if prev.prev is not None:
                prev.prev.next = block
            elif block.segment is not None:
                block.segment.head = block
        if nxt is not None and not nxt.allocated and nxt.mapped:
            self._remove(nxt)
            block.size, block.next = block.size + nxt.size, nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        self._insert(block)

    # ------------------------------------------------------------------ expandable segments
    def _segment(self, pool_key: tuple) -> _Expandable:
        seg = self._expandable.get(pool_key)
        if seg is None:
            seg = _Expandable(K_SMALL_BUFFER if pool_key[1] else K_LARGE_BUFFER)
            head = _Block(self._next_address, _EXPANDABLE_SPAN, pool_key, seg)
            head.mapped = False
            self._next_address += _EXPANDABLE_SPAN
            seg.head, seg.unmapped = head, [head]
            self._expandable[pool_key] = seg
            self.segments += 1
        return seg

    def _expand(self, size: int, pool_key: tuple) -> _Block | None:
        """``find_expandable_block`` + ``try_allocate_expandable_block``: the lowest unmapped
        range (with the free block before it) that covers ``size``, mapped page by page."""
        seg = self._segment(pool_key)
        for b in seg.unmapped:
            start = b.prev if b.prev is not None and not b.prev.allocated and b.prev.mapped else b
            have, c = 0, start
            while c is not None and not c.allocated and have < size:
                have += c.size
                c = c.next
            if have >= size:
                return self._map_chain(start, size, seg)
        return None

    def _map_chain(self, start: _Block, size: int, seg: _Expandable) -> _Block | None:
        """Map the unmapped blocks of the chain from ``start`` until it holds ``size`` bytes;
        returns the chain merged into one free mapped block (taken out of the pool)."""
        page = seg.page
        block = start
        if block.mapped:
            self._remove(block)
        while block.size < size or not block.mapped:
            target = block if not block.mapped else block.next
            need = size - (block.size if block.mapped else 0)
            pages = -(-need // page)
            mapped = min(pages * page, target.size)
            if not self._fits(mapped):
                if block.mapped:
                    self._insert(block)
                return None
            self._grow(mapped)
            at = seg.unmapped.index(target)
            if mapped < target.size:  # the rest of the unmapped range stays unmapped
                rest = _Block(target.address + mapped, target.size - mapped, target.pool, seg)
                rest.mapped = False
                rest.prev, rest.next = target, target.next
                if target.next is not None:
                    target.next.prev = rest
                target.next, target.size = rest, mapped
                seg.unmapped[at] = rest
            else:
                del seg.unmapped[at]
            target.mapped = True
            if target is not block:  # merge the new pages into the free block before them
                block.size += target.size
                block.next = target.next
                if target.next is not None:
                    target.next.prev = block
            nxt = block.next  # a free mapped block right after joins too
            if nxt is not None and nxt.mapped and not nxt.allocated:
                self._remove(nxt)
                block.size += nxt.size
                block.next = nxt.next
                if nxt.next is not None:
                    nxt.next.prev = block
        return block

    # ------------------------------------------------------------------ cache
    def empty_cache(self) -> None:
        """Return what is wholly free: cudaMalloc segments without a live block, and the
        whole pages of free blocks in expandable segments."""
        for pool_key, pool in self._pools.items():
            kept = []
            unmap = []
            for entry in pool:
                b = entry[2]
                if b.segment is not None:
                    unmap.append(b)
                elif b.prev is None and b.next is None:
                    self.reserved -= b.size
                    self.segments -= 1
                else:
                    kept.append(entry)
            self._pools[pool_key] = kept
            for b in unmap:
                self._unmap(b, kept)
            kept.sort()
        for seg in self._expandable.values():
            seg.rescan()

    def _unmap(self, b: _Block, pool: list) -> None:
        """``unmap_block``: the whole pages inside a free expandable block go back."""
        page = b.segment.page
        base = b.segment.head.address
        lo = base + -(-(b.address - base) // page) * page
        hi = base + (b.address + b.size - base) // page * page
        if hi <= lo:
            pool.append((b.size, b.address, b))
            return
        if lo > b.address:  # a free mapped piece before the unmapped pages
            before = _Block(b.address, lo - b.address, b.pool, b.segment)
            before.prev, before.next = b.prev, b
            if b.prev is not None:
                b.prev.next = before
            else:
                b.segment.head = before
            b.prev = before
            pool.append((before.size, before.address, before))
        if hi < b.address + b.size:  # ... and after them
            after = _Block(hi, b.address + b.size - hi, b.pool, b.segment)
            after.prev, after.next = b, b.next
            if b.next is not None:
                b.next.prev = after
            b.next = after
            pool.append((after.size, after.address, after))
        self.reserved -= hi - lo
        b.address, b.size, b.mapped = lo, hi - lo, False
        for other in (b.prev, b.next):  # neighbouring unmapped ranges become one
            if other is not None and not other.mapped:
                first, second = (other, b) if other is b.prev else (b, other)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                b = first

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved, self.peak_requested = self.allocated, self.reserved, self.requested
