"""The caching-allocator replay (profiler/measure/allocator.py): its rules one by one, as
c10/cuda/CUDACachingAllocator.cpp states them, and the sim's replay against
max_memory_allocated / max_memory_reserved measured on an H200 (results/cuda/h200)."""
from __future__ import annotations

from pathlib import Path

import pytest

from estimator.setup import Setup
from estimator.units import MiB
from profiler.measure.allocator import CachingAllocatorModel, allocation_size, replay, round_size
from profiler.measure.run import run_case
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]

#: The replay against the GPU's counters, training cases (measured on the 68 training
#: cases of the H200 campaign: allocated within 0.52 %, reserved within 5 %, most under 1 %).
ALLOCATED_TOLERANCE = 0.005
RESERVED_TOLERANCE = 0.01


def test_sizes_round_and_segments_are_sized_as_the_allocator_does():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert allocation_size(1000) == 2 * MiB            # small pool: 2 MiB segments
    assert allocation_size(5 * MiB) == 20 * MiB        # 1-10 MiB: a 20 MiB segment
    assert allocation_size(33 * MiB) == 34 * MiB       # larger: rounded up to 2 MiB


def test_a_remainder_of_at_most_1_mib_is_not_split_and_counts_as_allocated():
    a = CachingAllocatorModel()
    a.malloc("x", 12 * MiB)        # a 12 MiB segment
    a.free("x")
    a.malloc("y", 11 * MiB + 512)  # 12 MiB cached block, remainder < 1 MiB: handed out whole
    assert a.allocated == 12 * MiB and a.requested == 11 * MiB + 512 and a.reserved == 12 * MiB
    a.free("y")
    a.malloc("z", 10 * MiB)        # remainder 2 MiB > 1 MiB: split
    assert a.allocated == 10 * MiB and a.reserved == 12 * MiB


def test_small_requests_pack_into_2_mib_segments_and_free_blocks_merge():
    a = CachingAllocatorModel()
    for i in range(4):
        a.malloc(i, 512 * 1024)
    assert a.reserved == 2 * MiB and a.allocated == 2 * MiB
    a.free(1)
    a.free(2)                      # merges with block 1: one free 1 MiB block
    a.malloc("big", 1 * MiB)
    assert a.reserved == 2 * MiB   # served from the merged block, no new segment


def test_empty_cache_returns_only_wholly_free_segments():
    a = CachingAllocatorModel()
    a.malloc("a", 30 * MiB)
    a.malloc("b", 5 * MiB)         # a 20 MiB segment, split
    a.free("a")
    a.empty_cache()
    assert a.reserved == 20 * MiB  # b's segment still holds b


def test_replay_takes_the_measured_meters_phases_and_resets_peaks_per_phase():
    events = [("m", ("begin", 1, "forward")), ("a", 1, 40 * MiB), ("m", ("matmul", 0)), ("f", 1),
              ("m", ("end", 1, "forward")), ("m", "empty_cache"),
              ("m", ("begin", 2, "forward")), ("a", 2, 20 * MiB), ("m", ("end", 2, "forward"))]
    out = replay(events, measured_meter=2, workspaces=[32 * MiB])
    assert out["forward"]["allocated_bytes.all.peak"] == 52 * MiB
    assert out["forward"]["reserved_bytes.all.peak"] == 52 * MiB  # the 40 MiB segment was released


def test_a_workspace_is_carved_from_the_cache_at_its_threads_first_matmul():
    """cuBLAS allocates a handle's workspace at the first call on its thread (the tracker's
    ("matmul", thread) mark), from whatever the cache holds then: here the freed 40 MiB block,
    which empty_cache can no longer return."""
    events = [("m", ("begin", 1, "forward")), ("a", 1, 40 * MiB), ("f", 1), ("m", ("matmul", 0)),
              ("m", ("matmul", 0)), ("m", ("end", 1, "forward")), ("m", "empty_cache"),
              ("m", ("begin", 2, "forward")), ("a", 2, 20 * MiB), ("m", ("end", 2, "forward"))]
    out = replay(events, measured_meter=2, workspaces=[32 * MiB, 32 * MiB])
    assert out["forward"]["allocated_bytes.all.peak"] == 52 * MiB  # one workspace: thread 1 never ran
    assert out["forward"]["reserved_bytes.all.peak"] == 60 * MiB  # 40 kept for the workspace, 20 new


CUDA_CASES = ["smollm2-360m full bf16 b1x256 sdpa",    # 58 MiB of block slack at the optimizer peak
              "gpt2-medium full fp32 b1x256 sdpa"]


@pytest.mark.parametrize("label", CUDA_CASES)
@pytest.mark.slow
def test_the_sim_replay_matches_the_h200s_allocator_counters(label):
    (gpu,) = [r for r in read_records(ROOT / "results/cuda/h200/cuda-standard.jsonl") if r.label == label]
    sim = run_case(gpu.case.model, Setup.from_dict(gpu.case.setup), "sim", steps=gpu.case.steps)
    assert sim.ok, sim.message
    allocated = max(p.memory_stats["allocated_bytes.all.peak"] for p in sim.measured.phases.values())
    want_alloc, want_res = gpu.measured.peak_allocated_bytes, gpu.measured.peak_reserved_bytes
    assert abs(allocated - want_alloc) / want_alloc <= ALLOCATED_TOLERANCE, (allocated, want_alloc)
    assert abs(sim.measured.peak_reserved_bytes - want_res) / want_res <= RESERVED_TOLERANCE


# --- the rules the estimator's replay adds (estimator/allocator.py) -------------------------------

from estimator.allocator import AllocConf, CachingAllocator  # noqa: E402


def test_a_block_freed_on_one_stream_is_not_reused_on_another():
    a = CachingAllocator()
    a.malloc("x", 30 * MiB, stream=1)  # an all-gather buffer on FSDP's side stream
    a.free("x")
    a.malloc("y", 30 * MiB, stream=0)  # the default stream cannot take it
    assert a.reserved == 60 * MiB
    a.malloc("z", 30 * MiB, stream=1)  # its own stream can
    assert a.reserved == 60 * MiB


def test_expandable_segments_grow_one_segment_by_20_mib_pages_and_leave_no_sliver():
    # the "N + 1" pattern of Note [Expandable Segments]: ten 25 MiB tensors, freed, then ten
    # of 27 MiB. Default: each 25 MiB one had a segment of its own (rounded to 26 MiB), which
    # no 27 MiB request fits: ten new 28 MiB segments beside the cached ones
    sizes_a, sizes_b = 25 * MiB, 27 * MiB
    default, expandable = CachingAllocator(), CachingAllocator(AllocConf(expandable_segments=True))
    for alloc in (default, expandable):
        for i in range(10):
            alloc.malloc(("a", i), sizes_a)
        for i in range(10):
            alloc.free(("a", i))
        for i in range(10):
            alloc.malloc(("b", i), sizes_b)
    assert default.reserved == 10 * 26 * MiB + 10 * 28 * MiB      # cached 26 MiB segments, new 28 MiB ones
    assert expandable.reserved == 280 * MiB                       # 270 MiB in 20 MiB pages, the freed space reused
    assert expandable.allocated == 270 * MiB                      # and blocks split to the byte


def test_expandable_empty_cache_unmaps_only_whole_free_pages():
    a = CachingAllocator(AllocConf(expandable_segments=True))
    a.malloc("x", 5 * MiB)    # maps one 20 MiB page
    a.malloc("y", 30 * MiB)   # 15 MiB free in the page, 15 more needed: one more page
    assert a.reserved == 40 * MiB
    a.free("y")
    a.empty_cache()           # y's space beyond x's page is a whole free page: unmapped
    assert a.reserved == 20 * MiB
    a.malloc("z", 30 * MiB)   # grows again where it was unmapped
    assert a.reserved == 40 * MiB


def test_max_split_size_keeps_oversize_blocks_whole():
    a = CachingAllocator(AllocConf(max_split_size_bytes=64 * MiB))
    a.malloc("big", 100 * MiB)
    a.free("big")
    a.malloc("small", 30 * MiB)   # under max_split_size: never takes an oversize block
    assert a.reserved == 130 * MiB
    a.malloc("near", 90 * MiB)    # over it: takes a cached one under request + 20 MiB, unsplit
    assert a.reserved == 130 * MiB and a.allocated == 130 * MiB


def test_a_card_size_frees_the_cache_and_retries_before_running_out():
    a = CachingAllocator(capacity_bytes=100 * MiB)
    a.malloc("x", 60 * MiB)
    a.free("x")                   # cached: reserved stays 60 MiB
    assert a.malloc("y", 70 * MiB)  # 60 + 70 > 100: the cached segment is released, then it fits
    assert a.num_alloc_retries == 1 and a.reserved == 70 * MiB
    assert not a.malloc("z", 40 * MiB) and a.oom  # 70 + 40 > 100 with nothing cached: out of memory


def test_alloc_conf_parses_torch_syntax_and_refuses_what_it_does_not_model():
    assert str(AllocConf.parse("max_split_size_mb:128, expandable_segments:True")) == \
        "expandable_segments:True,max_split_size_mb:128"
    assert AllocConf.parse("") == AllocConf()
    with pytest.raises(ValueError, match="not modelled; modelled: expandable_segments, max_split_size_mb"):
        AllocConf.parse("garbage_collection_threshold:0.6")
    with pytest.raises(ValueError, match="must be an integer over 20"):
        AllocConf.parse("max_split_size_mb:20")
    with pytest.raises(ValueError, match="takes True or False"):
        AllocConf.parse("expandable_segments:yes")
    assert Setup(alloc_conf="expandable_segments:True").allocator.expandable_segments
