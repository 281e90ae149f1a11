"""The real out-of-memory boundary beside ``fit``'s: for each setup and each card size, cap
the caching allocator with ``torch.cuda.set_per_process_memory_fraction`` to the card and
binary-search the largest batch that runs three steps (the first, where the optimizer makes
its state, and two more), then put fit's largest safe batch and its point estimate beside it.

The cap limits what the allocator may reserve (CUDACachingAllocator.cpp ``alloc_block``:
a cudaMalloc that would take ``total_allocated_memory`` past ``allowed_memory_maximum``
fails, the cache is freed and the allocation retried, then it is out of memory), the CUDA
context and libraries aside: fit is asked the same question (``Limit.ALLOCATOR``). Each
setup's model is built once on the device; every attempt starts from it with the cache
emptied (so fit is asked about a model placed once, ``Load.PRETRAINED``), makes its
optimizer afresh and runs a plain loop (no ``empty_cache`` between steps, as a Trainer).

    python benchmarks/oom_boundary.py --backend cuda --out out/oom-boundary.jsonl   # a lent GPU
    python benchmarks/oom_boundary.py --backend sim --setups tiny --cards 1GB       # rehearsal, CPU

On the sim (fake tensors, nothing runs out) an attempt is the sim's step with its tensor trace
replayed through the allocator's rules, "out of memory" where its reserved peak passes the cap
(no retries): it rehearses the search, the records and the comparison, not the boundary.

One JSON line per (setup, card): the measured largest batch, every attempt (batch, ok,
max_memory_reserved, seconds), fit's verdicts and batches; then a table. Exit 0 when every
setup ran, 1 when one failed for another reason than memory, 2 on bad input.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.fit import Limit, fit  # noqa: E402
from estimator.gpus import gpu_named  # noqa: E402
from estimator.modelspec import load_model  # noqa: E402
from estimator.setup import Load, Setup  # noqa: E402
from estimator.units import GB, parse_bytes  # noqa: E402

#: the card sizes emulated (bytes, 10^9): the usual 16, 24, 40 and 80 GB parts
CARDS = ("16GB", "24GB", "40GB", "80GB")
#: steps each attempt runs (the first and two more)
STEPS = 3
#: the largest batch searched
MAX_BATCH = 4096


@dataclass(frozen=True)
class Case:
    model: str
    setup: Setup

    @property
    def label(self) -> str:
        s = self.setup
        extra = [x for x in (s.attn.value if s.attn.value != "sdpa" else "", "ckpt" if s.grad_ckpt else "",
                             s.alloc_conf, f"+{s.new_tokens}tok" if s.new_tokens else "") if x]
        return " ".join([self.model, s.mode.value, s.precision.value, f"s{s.seq}", *extra])


#: 14 setups of the H200 campaign's models (seven architectures), the batch searched
SETUPS = (
    Case("smollm2-360m", Setup(precision="bf16", seq=512)),
    Case("smollm2-360m", Setup(mode="lora", precision="bf16", seq=1024)),
    Case("qwen2.5-0.5b", Setup(precision="bf16", seq=512)),
    Case("qwen2.5-0.5b", Setup(precision="bf16", seq=512, grad_ckpt=True)),
    Case("qwen2.5-0.5b", Setup(precision="amp-bf16", seq=512)),
    Case("tinyllama-1.1b", Setup(precision="bf16", seq=512)),
    Case("tinyllama-1.1b", Setup(precision="bf16", seq=512, alloc_conf="expandable_segments:True")),
    Case("tinyllama-1.1b", Setup(mode="lora", precision="bf16", seq=1024)),
    Case("gpt2-medium", Setup(precision="bf16", seq=1024)),
    Case("gpt2-medium", Setup(precision="fp32", seq=512)),
    Case("opt-1.3b", Setup(precision="bf16", seq=512)),
    Case("phi-3-mini", Setup(mode="lora", precision="bf16", seq=512, lora_targets=("qkv_proj",))),
    Case("gemma-2-2b", Setup(mode="lora", precision="bf16", seq=512, attn="eager")),
    Case("smollm2-360m", Setup(mode="inference", precision="bf16", seq=512, new_tokens=16)),
)
#: the rehearsal's: one small model, fast on fake tensors
TINY = (Case("smollm2-135m", Setup(precision="bf16", seq=128)),
        Case("smollm2-135m", Setup(mode="inference", precision="bf16", seq=128, new_tokens=4)))


def fit_side(case: Case, card: int, backend: str) -> dict:
    """What fit says of the case on a card of ``card`` bytes under the allocator cap: its
    largest safe batch, and the largest batch whose replayed step runs within the card (with
    the allocator's retries on cuda; its reserved peak under the card on the sim, which has none)."""
    from estimator.estimate import estimate
    from estimator.fit import _largest
    gpu = gpu_named(_device_name()) if backend == "cuda" else None
    setup = case.setup.replace(load=Load.PRETRAINED,
                               empty_cache_steps=1 if backend == "sim" and case.setup.training else 0)
    spec = load_model(case.model)
    result = fit(spec, setup, card, gpu, limit=Limit.ALLOCATOR)

    def runs(b: int) -> bool:
        est = estimate(spec, setup.replace(batch=b), gpu)
        return est.runs_within(card) if backend == "cuda" else est.reserved_bytes <= card

    point = _largest(runs, MAX_BATCH, max(result.max_batch, 1))
    return {"safe_batch": result.max_batch, "point_batch": point, "verdict_at_given": result.judgement.verdict.value,
            "margin": [result.margin.min_ratio, result.margin.max_ratio, result.margin.cases]}


def _device_name() -> str | None:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a name for the record only
        return None


class CudaRunner:
    """One setup's model on the GPU; :meth:`attempt` runs three steps at a batch under a cap."""

    def __init__(self, case: Case):
        import torch

        from profiler.measure.build import build_model
        self.torch = torch
        self.case, self.spec = case, load_model(case.model)
        self.model = build_model(self.spec, case.setup.replace(device="cuda"), "cuda")
        self.total = torch.cuda.get_device_properties(0).total_memory

    def attempt(self, batch: int, card: int) -> tuple[bool, int, float, str]:
        torch = self.torch
        from profiler.measure.build import autocast_context, build_optimizer, synthetic_batch
        setup = self.case.setup.replace(batch=batch, device="cuda")
        torch.cuda.set_per_process_memory_fraction(min(card / self.total, 1.0))
        # the setup's PYTORCH_CUDA_ALLOC_CONF, set at run time (torch/cuda/memory.py
        # _set_allocator_settings) since one process runs every setup; expandable segments
        # off again otherwise (no setup here sets max_split_size_mb, which once set stays)
        conf = setup.allocator
        settings = f"expandable_segments:{conf.expandable_segments}"
        if conf.max_split_size_bytes is not None:
            settings += f",max_split_size_mb:{conf.max_split_size_bytes // 2**20}"
        set_settings = getattr(torch.cuda.memory, "_set_allocator_settings", None)
        if set_settings is not None:
            set_settings(settings)
        elif str(conf):
            raise RuntimeError(f"this torch ({torch.__version__}) cannot set {conf} at run time")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0, ok, why = time.perf_counter(), True, ""
        opt = ids = None
        try:
            ids = synthetic_batch(self.spec, setup, "cuda")
            if setup.training:
                opt = build_optimizer(self.model, setup)
                for _ in range(STEPS):
                    with autocast_context(setup, "cuda"):
                        loss = self.model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    loss = None
                    if opt is not None:
                        opt.step()
                    self.model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    for _ in range(STEPS):
                        self.model.generate(input_ids=ids, max_new_tokens=max(setup.new_tokens, 1),
                                            min_new_tokens=max(setup.new_tokens, 1), do_sample=False)
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as exc:
            ok, why = False, str(exc).splitlines()[0][:200]
        finally:
            opt = ids = None
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        return ok, int(torch.cuda.max_memory_reserved()), round(time.perf_counter() - t0, 3), why


class SimRunner:
    """The rehearsal: each attempt a sim step whose replayed reserved peak must stay under the cap."""

    def __init__(self, case: Case):
        self.case = case

    def attempt(self, batch: int, card: int) -> tuple[bool, int, float, str]:
        from profiler.measure.run import run_case
        t0 = time.perf_counter()
        record = run_case(self.case.model, self.case.setup.replace(batch=batch), "sim", steps=STEPS - 1)
        if not record.ok:
            raise RuntimeError(f"{self.case.label} b{batch}: {record.message}")
        reserved = int(record.measured.peak_reserved_bytes or 0)
        return reserved <= card, reserved, round(time.perf_counter() - t0, 3), ""


def search(runner, card: int, guess: int, attempts: list) -> int:
    """The largest batch in [1, MAX_BATCH] that runs (0 if none), galloping from ``guess``."""
    seen: dict[int, bool] = {}

    def runs(b: int) -> bool:
        if b not in seen:
            ok, reserved, seconds, why = runner.attempt(b, card)
            seen[b] = ok
            attempts.append({"batch": b, "ok": ok, "reserved_bytes": reserved, "s": seconds, "why": why})
        return seen[b]

    from estimator.fit import _largest
    return _largest(runs, MAX_BATCH, max(guess, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("cuda", "sim"), default="cuda")
    p.add_argument("--cards", default=",".join(CARDS), help="card sizes, e.g. 16GB,24GB (default: 16/24/40/80 GB)")
    p.add_argument("--setups", choices=("all", "tiny"), default="all")
    p.add_argument("--limit", type=int, default=0, help="only the first N setups")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("CALL_BUDGET_S", 480)),
                   help="no setup starts after this many seconds (default 480)")
    p.add_argument("--out", default="oom-boundary.jsonl")
    args = p.parse_args(argv)
    try:
        cards = sorted(parse_bytes(c) for c in args.cards.split(",") if c.strip())
    except ValueError as exc:
        print(f"oom_boundary: {exc}", file=sys.stderr)
        return 2
    if not cards:
        print("oom_boundary: --cards is empty; give sizes, e.g. 16GB,24GB", file=sys.stderr)
        return 2
    if args.backend == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("oom_boundary: --backend cuda needs a CUDA GPU and torch sees none; rehearse with --backend sim",
                  file=sys.stderr)
            return 2
    cases = list(TINY if args.setups == "tiny" else SETUPS)[: args.limit or None]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start, failed, rows = time.perf_counter(), 0, []
    for case in cases:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {case.label} and the rest not run", file=sys.stderr)
            break
        try:
            runner = CudaRunner(case) if args.backend == "cuda" else SimRunner(case)
            for card in cards:
                predicted = fit_side(case, card, args.backend)
                attempts: list = []
                measured = search(runner, card, predicted["point_batch"] or predicted["safe_batch"], attempts)
                row = {"model": case.model, "setup": case.setup.to_dict(), "label": case.label, "card_bytes": card,
                       "backend": args.backend, "device": _device_name(), "measured_batch": measured,
                       "fit": predicted, "attempts": attempts}
                rows.append(row)
                with out.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                print(f"{case.label:48s} {card / GB:5.0f} GB  measured {measured:5d}  fit safe "
                      f"{predicted['safe_batch']:5d}  point {predicted['point_batch']:5d}  ({len(attempts)} runs)",
                      flush=True)
            del runner
        except Exception as exc:  # noqa: BLE001 - one setup's failure is reported, the others still run
            failed += 1
            print(f"{case.label}: {type(exc).__name__}: {exc}", file=sys.stderr)
    safe_ok = sum(1 for r in rows if r["fit"]["safe_batch"] <= r["measured_batch"])
    print(f"{len(rows)} (setup, card) pairs: fit's safe batch at or under the measured boundary in {safe_ok}; "
          f"records in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
