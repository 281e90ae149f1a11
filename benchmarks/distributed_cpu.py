"""Real multi-rank CPU steps (torchrun, gloo) of FSDP1 and FSDP2, for results/distributed/.

    python benchmarks/distributed_cpu.py [--out results/distributed/cpu-fsdp.jsonl] [--only SUBSTRING]

Every rank's record is appended to ``--out``; a table of the estimator's error per rank and
phase (prediction vs the tracked peak of live tensor bytes) is printed at the end. Each
case takes 30-90 s on 2 cores."""
from __future__ import annotations

import argparse
from pathlib import Path

from estimator.setup import Setup
from profiler.measure.distributed import run_distributed

PHASES = ("forward", "backward", "optimizer")
BASE = dict(precision="fp32", batch=2, seq=256)
QWEN_L2, LLAMA_L2 = "benchmarks/configs/qwen2.5-0.5b-L2.json", "benchmarks/configs/llama-3.2-1b-L2.json"
QLORA = dict(precision="bf16", batch=1, seq=512, mode="qlora", quant="nf4-dq", lora_targets="all-linear")
#: --fsdp-wrap layers at a long sequence with checkpointing, as accelerate's FSDP1 runs it
LAYERS_LONG = dict(batch=1, seq=2048, lora_targets="all-linear", grad_ckpt=True)
LONG_LORA = dict(precision="bf16", batch=1, seq=2048, mode="lora", lora_targets="all-linear", grad_ckpt=True)
#: (model, nproc, setup changes)
CASES = [
    ("gpt2", 2, dict(sharding="fsdp1", seq=128)),
    ("gpt2", 2, dict(sharding="fsdp1-shard-grad-op", seq=128)),
    ("gpt2", 2, dict(sharding="fsdp1", seq=128, mode="lora", lora_targets=("c_attn",))),
    ("gpt2", 2, dict(sharding="fsdp", seq=128)),
    ("opt-125m", 2, dict(sharding="fsdp1")),
    ("smollm2-135m", 2, dict(sharding="fsdp1")),
    ("smollm2-135m", 2, dict(sharding="fsdp1-shard-grad-op")),
    ("smollm2-135m", 2, dict(sharding="fsdp1", mode="lora")),
    ("smollm2-135m", 2, dict(sharding="fsdp1", grad_ckpt=True)),
    ("smollm2-135m", 2, dict(sharding="fsdp1", precision="bf16")),
    ("smollm2-135m", 2, dict(sharding="fsdp1", precision="amp-bf16")),
    ("smollm2-135m", 2, dict(sharding="fsdp1", grad_accum=2)),
    ("smollm2-135m", 2, dict(sharding="fsdp")),
    ("smollm2-135m", 4, dict(sharding="fsdp1")),
    # added with the head-gradient moment for FSDP2 (accumulating: -2.64 % before)
    ("gpt2", 2, dict(sharding="fsdp", seq=128, grad_accum=2)),
    ("gpt2", 2, dict(sharding="fsdp1", seq=128, grad_accum=2)),
    ("smollm2-135m", 2, dict(sharding="fsdp", keep_grads=True)),
    # issue 25 item 4: QLoRA (bf16, nf4-dq, all-linear; no kbit preparation under FSDP, as TRL)
    # and bf16 LoRA at long sequence with checkpointing, FSDP1 as accelerate runs it and FSDP2
    *[(m, n, dict(QLORA, sharding=sh)) for m, n, sh in (
        ("gpt2", 2, "fsdp1"), ("gpt2", 2, "fsdp"),
        (QWEN_L2, 2, "fsdp1"), (QWEN_L2, 2, "fsdp"),
        (LLAMA_L2, 2, "fsdp1"), (LLAMA_L2, 4, "fsdp"),
        ("smollm2-135m", 4, "fsdp1"))],
    (LLAMA_L2, 2, dict(QLORA, sharding="fsdp1", grad_ckpt=True, seq=2048)),
    ("smollm2-135m", 2, dict(LONG_LORA, sharding="fsdp1")),
    ("smollm2-135m", 2, dict(LONG_LORA, sharding="fsdp")),
    (QWEN_L2, 2, dict(LONG_LORA, sharding="fsdp1")),
    # issue 25: FSDP1 LoRA with one unit per decoder layer only (--fsdp-wrap layers): the frozen weights
    # share a flat parameter with the adapters (fp32 or fp32-loaded amp: one dtype per flat parameter)
    *[(m, n, dict(changes, sharding=sh, mode="lora", fsdp_wrap="layers")) for m, n, sh, changes in (
        ("smollm2-135m", 2, "fsdp1", {}),
        ("smollm2-135m", 2, "fsdp1", dict(LAYERS_LONG, precision="amp-bf16")),
        ("smollm2-135m", 2, "fsdp1", dict(precision="amp-bf16", seq=512, lora_targets="all-linear")),
        ("gpt2", 2, "fsdp1-shard-grad-op", dict(seq=512, lora_targets=("c_attn",))),
        (QWEN_L2, 2, "fsdp1", dict(seq=512, lora_targets="all-linear")),
        (LLAMA_L2, 2, "fsdp1", dict(LAYERS_LONG, precision="amp-bf16")))],
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/distributed/cpu-fsdp.jsonl")
    ap.add_argument("--only", default="", help="run the cases whose label contains this")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model, nproc, changes in CASES:
        setup = Setup(**{**BASE, **changes})
        sized = f" {setup.quant} s{setup.seq}" if "quant" in changes else f" s{setup.seq}" if setup.seq >= 2048 else ""
        label = f"{Path(model).stem} x{nproc} {setup.sharding} {setup.mode} {setup.precision}{sized}" + \
            (" ckpt" if setup.grad_ckpt else "") + (f" accum{setup.grad_accum}" if setup.grad_accum > 1 else "") + \
            (" keep-grads" if setup.keep_grads else "") + (" layer-units" if setup.layer_units else "")
        if args.only not in label:
            continue
        for r in run_distributed(model, setup, "cpu", steps=2, nproc=nproc, out=args.out, timeout_s=900):
            errs = []
            for phase in PHASES:
                got = r.measured.phases[phase].peak_allocated_bytes if r.ok and phase in r.measured.phases else None
                pred = sum(v for k, v in r.predicted.phases.get(phase, {}).items() if k not in ("allocator", "context"))
                errs.append(f"{(pred - got) / got:+.2%}" if got else "-")
            rows.append((label, r.rank, r.status.value, *errs))
            print(" | ".join(map(str, rows[-1])), flush=True)
    print("\n| case | rank | status | " + " | ".join(PHASES) + " |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
