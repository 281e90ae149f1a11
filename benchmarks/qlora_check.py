"""QLoRA and 8-bit setups: the estimate beside real cpu steps per phase, and the sim with CPU
semantics beside the same cpu step to the byte. Prints one line per case; exit 0 when every
phase is within --tolerance and every sim phase equals its cpu phase, 1 otherwise, 2 when it
could not run (no bitsandbytes).

    python benchmarks/qlora_check.py smollm2-135m --seq 128 --only nf4-dq,none
"""
from __future__ import annotations

import argparse
import sys
import time

from estimator.categories import TENSOR_CATEGORIES
from estimator.modelspec import load_model, spec_from_config
from estimator.setup import Setup
from profiler.measure.run import run_case

#: the setups of issue 25: quantizations, both preparations, checkpointing, 8-bit optimizers
SETUPS = {
    "nf4-dq": dict(quant="nf4-dq"),
    "none": dict(quant="nf4-dq", kbit_prep="none"),
    "nf4": dict(quant="nf4"),
    "fp4": dict(quant="fp4"),
    "ckpt": dict(quant="nf4-dq", grad_ckpt=True),
    "int8": dict(quant="int8"),
    "adamw-8bit": dict(quant="nf4-dq", optimizer="adamw-8bit"),
    "paged-8bit": dict(quant="nf4-dq", optimizer="paged-adamw-8bit"),
}
T = {c.value for c in TENSOR_CATEGORIES}


def reduced(name: str, layers: int | None):
    spec = load_model(name)
    if not layers:
        return spec
    cfg = dict(spec.config)
    cfg["n_layer" if "n_layer" in cfg else "num_hidden_layers"] = layers
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:layers]
    return spec_from_config(cfg, name=f"{spec.name}-L{layers}", source=spec.source)


def phase_bytes(record) -> dict[str, int]:
    return {ph: m.peak_allocated_bytes for ph, m in record.measured.phases.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--only", default="")
    ap.add_argument("--no-sim", action="store_true", help="skip the sim's byte comparison")
    ap.add_argument("--tolerance", type=float, default=0.01)
    a = ap.parse_args(argv)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes is not installed (pip install 'vramlab[quant]'): nothing to check", file=sys.stderr)
        return 2
    spec = reduced(a.model, a.layers)
    ok = True
    for key in (a.only.split(",") if a.only else SETUPS):
        setup = Setup(mode="qlora", batch=a.batch, seq=a.seq, device="cpu", lora_targets=a.targets, **SETUPS[key])
        t0 = time.time()
        real = run_case(spec.name, setup, "cpu", steps=1, spec=spec)
        if not real.ok:
            print(f"{key:11s} cpu {real.status}: {real.message[:200]}")
            ok = False
            continue
        cols = []
        for ph, m in real.measured.phases.items():
            if ph not in real.predicted.phases:
                continue
            est = sum(v for k, v in real.predicted.phases[ph].items() if k in T)
            err = est / m.peak_allocated_bytes - 1
            ok &= abs(err) <= a.tolerance
            cols.append(f"{ph} {m.peak_allocated_bytes / 2**20:8.1f} MiB {err * 100:+.2f}%")
        sim = ""
        if not a.no_sim and key != "int8":
            fake = run_case(spec.name, setup, "sim", steps=1, spec=spec)
            diff = {ph: b - phase_bytes(real).get(ph, 0) for ph, b in phase_bytes(fake).items()} if fake.ok else {}
            same = fake.ok and not any(diff.values())
            ok &= same
            sim = "sim = cpu to the byte" if same else f"sim differs: {fake.status} {diff or fake.message[:120]}"
        print(f"{key:11s} {'  '.join(cols)}  {sim}  ({time.time() - t0:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
