"""Benchmark: StorageTracker overhead on a simulated (FakeTensorMode) llama-2-7b step.

One training step -- forward with labels, backward, ``AdamW(foreach=False).step()``,
``zero_grad(set_to_none=True)`` -- of llama-2-7b (bf16, batch 1, seq 512) under
``FakeTensorMode`` on CPU, timed

* untracked,
* with ``profiler.measure.tracker.StorageTracker`` (phases + grad/optimizer tagging hooks),
* with PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker``.

Every measured step uses a fresh optimizer, so the step allocates the AdamW state
(the first training step is the one whose peak matters). One untimed warm-up step
fills FakeTensorMode's dispatch cache first, so no variant pays for it.

Targets: StorageTracker overhead <= 2x untracked; StorageTracker >= 5x faster than
MemTracker; the two peaks within 1%; the simulated FSDP2 rank of a 70B model (a whole
``vramlab profile`` subprocess) within FSDP_SIM_TARGET_STEPS untracked fake steps of
llama-2-7b. Every time figure is a ratio of two timings of the same run (interleaved, the
fastest kept), so a busy machine slows both sides alike and the verdict holds.

Exit code 0 when every target is met, 1 when one is missed (a real regression), 2 when the
benchmark cannot run; a comparison that cannot run here (MemTracker missing) is n/a.

    PYTHONPATH=. python benchmarks/bench_profiler.py [--layers 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import textwrap
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from estimator.categories import Category, Phase  # noqa: E402
from profiler.measure.tracker import StorageTracker  # noqa: E402

OVERHEAD_TARGET = 2.0  # tracked / untracked step time, at most
SPEEDUP_TARGET = 5.0  # MemTracker / StorageTracker step time, at least
PEAK_TOLERANCE = 0.01  # |peak_ours - peak_memtracker| / peak_memtracker, at most

GiB = 2**30


def build_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(  # meta-llama/Llama-2-7b-hf sizes
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)


def run_step(model, ids, tracker: StorageTracker | None = None) -> float:
    """One fresh-optimizer training step; returns its wall time in seconds."""
    gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    if tracker is not None:
        tracker.track(model, Category.WEIGHTS)
        tracker.watch_grads(model)
        tracker.watch_optimizer(opt)
    t0 = time.perf_counter()
    if tracker is None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        tr = tracker
        with tr:
            tr.default_category = Category.ACTIVATIONS
            with tr.phase(Phase.FORWARD):
                out = model(input_ids=ids, labels=ids)
            tr.default_category = Category.TEMPORARIES
            with tr.phase(Phase.BACKWARD):
                out.loss.backward()
                del out
            with tr.phase(Phase.OPTIMIZER):
                opt.step()
            with tr.phase(Phase.ZERO_GRAD):
                opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    if tracker is not None:
        tracker.remove_hooks()
    del opt
    return dt


def run_memtracker(model, ids) -> tuple[float, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    gc.collect()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    mt = MemTracker()
    mt.track_external(model, opt)
    t0 = time.perf_counter()
    with mt:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    peak = sum(dev["Total"] for dev in mt.get_tracker_snapshot("peak").values())
    del opt, mt
    return dt, peak


def fmt_gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant (min is kept)")
    ap.add_argument("--skip-memtracker", action="store_true")
    ap.add_argument("--skip-fsdp", action="store_true", help="skip the simulated 70B FSDP rank")
    args = ap.parse_args()

    t_start = time.perf_counter()
    with FakeTensorMode():
        t0 = time.perf_counter()
        model = build_llama(args.layers)
        t_build = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, 32000, (args.batch, args.seq))
        t_warm = run_step(model, ids)  # fills the fake-mode dispatch cache

        plain, tracked = [], []
        tracker = None
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            plain.append(run_step(model, ids))
            tracker = StorageTracker()
            tracked.append(run_step(model, ids, tracker))
        res = tracker.results()

        mt_time = mt_peak = None
        mt_error = None
        if args.skip_memtracker:
            mt_error = "skipped (--skip-memtracker)"
        else:
            try:
                mt_time, mt_peak = run_memtracker(model, ids)
            except Exception as e:  # report, don't crash the table
                mt_error = f"{type(e).__name__}: {e}".splitlines()[0][:150]
                traceback.print_exc(file=sys.stderr)

    t_plain, t_tracked = min(plain), min(tracked)
    overhead = t_tracked / t_plain
    print("# StorageTracker benchmark: llama-2-7b sim step (FakeTensorMode, CPU)\n")
    print(textwrap.fill(f"torch {torch.__version__}, python {platform.python_version()}, "
                        f"{os.cpu_count()} CPUs, threads={torch.get_num_threads()}; "
                        f"model {args.layers} layers, {n_params / 1e9:.3f} B params bf16, "
                        f"batch {args.batch} x seq {args.seq}; build {t_build:.2f} s, warm-up step {t_warm:.2f} s; "
                        f"{res.n_allocs} storages allocated / {res.n_frees} freed in the tracked step; "
                        f"min of {args.repeats} runs", 78) + "\n")
    rows = [
        ("untracked fake step", f"{t_plain:.2f}", "1.00x", "-", "-", "-"),
        ("StorageTracker", f"{t_tracked:.2f}", f"{overhead:.2f}x", fmt_gib(res.peak_bytes),
         f"overhead <= {OVERHEAD_TARGET:.0f}x", "PASS" if overhead <= OVERHEAD_TARGET else "FAIL"),
    ]
    if mt_time is not None:
        speedup = mt_time / t_tracked
        rel = abs(res.peak_bytes - mt_peak) / mt_peak
        rows.append(("torch MemTracker", f"{mt_time:.2f}", f"{mt_time / t_plain:.2f}x", fmt_gib(mt_peak),
                     f"ours >= {SPEEDUP_TARGET:.0f}x faster: {speedup:.1f}x",
                     "PASS" if speedup >= SPEEDUP_TARGET else "FAIL"))
        rows.append(("peak agreement", "-", "-", f"diff {res.peak_bytes - mt_peak:+d} B ({rel:.4%})",
                     f"within {PEAK_TOLERANCE:.0%}", "PASS" if rel <= PEAK_TOLERANCE else "FAIL"))
    else:
        rows.append(("torch MemTracker", "n/a", "n/a", "n/a", "could not run: " + mt_error, "n/a"))
    hdr = ("variant", "step s", "vs untracked", "peak", "target", "result")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join("---" for _ in hdr) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\n" + textwrap.fill("step s: the fastest of the timed steps; vs untracked: that time over the "
                              "untracked step's (the figure the targets read); peak: live tensor bytes at the "
                              "step's peak, GiB = 2^30 B.", 78))

    cats = [c.value for c in Category if any(p.peak_breakdown.get(c.value) for p in res.phases)]
    print("\n## StorageTracker phases (GiB; breakdown at each phase's peak)\n")
    print("| phase | start | peak | end | " + " | ".join(cats) + " |")
    print("|" + "|".join("---" for _ in range(4 + len(cats))) + "|")
    for p in res.phases:
        print(f"| {p.name} | {p.start_bytes / GiB:.3f} | {p.peak_bytes / GiB:.3f} | {p.end_bytes / GiB:.3f} | "
              + " | ".join(f"{p.peak_breakdown.get(c, 0) / GiB:.3f}" for c in cats) + " |")
    if not args.skip_fsdp:
        rows.append(print_fsdp_sim(t_plain))
    print(f"\npeak {res.peak_bytes} B; total benchmark wall time {time.perf_counter() - t_start:.1f} s")
    missed = [r[0] for r in rows if r[-1] == "FAIL"]
    if missed:
        print(f"MISSED: {', '.join(missed)} (exit 1)")
    return 1 if missed else 0


#: A simulated FSDP2 rank of a 70B model: the whole command's wall time, in untracked fake
#: llama-2-7b steps of the same run, at most this: the old absolute target (15 s) over the
#: untracked step's time on the project's 2-core VM (T_PLAIN_REFERENCE_S).
T_PLAIN_REFERENCE_S = 1.85  # 2026-12-02, load 0.8 of 2 cores, torch 2.13.0+cpu, the fastest of 2
FSDP_SIM_TARGET_STEPS = 15.0 / T_PLAIN_REFERENCE_S
FSDP_SIM = ["profile", "llama-2-70b", "--backend", "sim", "--nproc", "64", "--sharding", "fsdp", "--grad-ckpt",
            "--seq", "1024", "--steps", "1", "--json"]


def print_fsdp_sim(t_plain: float) -> tuple:
    """``vramlab profile llama-2-70b --backend sim --nproc 64 --sharding fsdp --grad-ckpt``:
    where its time goes, and its wall time in untracked steps (the returned row). Measured
    with py-spy (2026-11-26): 30 s before, a third of it in DTensor's sharding propagation for
    every foreach op of the optimizer step (never cached) and a fifth in making all 64 chunks
    of every parameter while sharding; the simulated rank now steps its local shards
    (distributed.LocalShardOptimizer) and builds only the chunks it reads
    (distributed._Chunks), with identical per-phase peaks."""
    import json
    import subprocess
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "profiler.cli", *FSDP_SIM], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"\nFSDP sim failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        return ("simulated FSDP2 rank", "-", "-", "-", "the command ran", "FAIL")
    timings = json.loads(proc.stdout)["timings"]
    work = timings["build_s"] + sum(timings["warmup_s"]) + sum(timings["step_s"])
    steps = wall / t_plain
    verdict = "PASS" if steps <= FSDP_SIM_TARGET_STEPS else "FAIL"
    print("\n## Simulated FSDP2 rank 0 of 64, llama-2-70b, checkpointing, seq 1024\n")
    print("| wall s | imports s | build s | warm-up s | step s | in untracked steps | target | result |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {wall:.1f} | {wall - work:.1f} | {timings['build_s']:.1f} | {sum(timings['warmup_s']):.1f} | "
          f"{sum(timings['step_s']):.1f} | {steps:.1f} | <= {FSDP_SIM_TARGET_STEPS:.1f} | {verdict} |")
    print("\n" + textwrap.fill(f"in untracked steps: the command's wall time over this run's untracked "
                              f"llama-2-7b fake step ({t_plain:.2f} s); the target is the old 15 s where that "
                              f"step took {T_PLAIN_REFERENCE_S:.2f} s.", 78))
    return ("simulated FSDP2 rank", f"{wall:.1f}", f"{steps:.1f}x", "-", f"<= {FSDP_SIM_TARGET_STEPS:.1f}x", verdict)


def _main() -> int:
    """main(), and exit code 2 (not 1, a missed target) when the benchmark itself breaks."""
    try:
        return main()
    except Exception:  # noqa: BLE001 - a broken benchmark is no verdict
        traceback.print_exc()
        return 2


if __name__ == "__main__":
    raise SystemExit(_main())
