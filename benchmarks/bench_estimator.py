"""Benchmark: how fast the estimator answers, measured in one run.

(a) cold ``vramlab estimate llama-2-7b --json`` in a fresh subprocess (median of 5)
    against answering the same question the way accelerate's ``estimate-memory`` does
    (accelerate/commands/estimate.py: import torch + transformers, build the model from
    its config under ``init_empty_weights`` / on the meta device, sum parameter sizes;
    median of 3). The config is read from the shipped JSON so neither side touches the
    network. Target: vramlab >= 10x faster.
(b) in-process ``estimator.estimate.estimate`` calls per second on llama-2-7b with a
    varying batch, after warm-up. Target: >= 50,000/s.
(c) one in-process ``fit`` (llama-2-7b, 24 GiB budget, default setup). Target: < 50 ms.

    python benchmarks/bench_estimator.py
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.estimate import estimate  # noqa: E402
from estimator.fit import fit  # noqa: E402
from estimator.modelspec import MODELS_DIR, load_model  # noqa: E402
from estimator.setup import Setup  # noqa: E402
from estimator.units import GiB  # noqa: E402

COLD_SPEEDUP_TARGET = 10.0  # accelerate-style / vramlab wall time, at least
ESTIMATES_PER_SEC_TARGET = 50_000  # at least
FIT_MS_TARGET = 50.0  # at most
COLD_RUNS_VRAMLAB = 5
COLD_RUNS_ACCELERATE = 3
WARMUP_ESTIMATES = 200
TIMED_ESTIMATES = 5_000
FIT_RUNS = 5

#: accelerate estimate-memory's method, minus the hub download (config from the shipped JSON)
ACCELERATE_STYLE = """
import json, sys
import torch, transformers
from accelerate import init_empty_weights
cfg = json.load(open(sys.argv[1]))
cfg = {k: v for k, v in cfg.items() if not k.startswith("_vramlab")}
config = transformers.AutoConfig.for_model(**cfg)
with init_empty_weights():
    model = transformers.AutoModelForCausalLM.from_config(config)
total = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "bytes_fp32": total}))
"""


def _vramlab_command() -> list:
    """The installed console script next to this interpreter (not a pyenv shim), else -m."""
    script = Path(sys.executable).parent / "vramlab"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "profiler.cli"]


def _wall(cmd: list, runs: int) -> tuple:
    times, out = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        out = proc.stdout
    return statistics.median(times), times, out


def bench_cold() -> dict:
    vram_cmd = _vramlab_command() + ["estimate", "llama-2-7b", "--json"]
    acc_cmd = [sys.executable, "-c", ACCELERATE_STYLE, str(MODELS_DIR / "llama-2-7b.json")]
    vram_median, vram_all, vram_out = _wall(vram_cmd, COLD_RUNS_VRAMLAB)
    acc_median, acc_all, acc_out = _wall(acc_cmd, COLD_RUNS_ACCELERATE)
    ours, theirs = json.loads(vram_out)["params"], json.loads(acc_out)["params"]
    if ours != theirs:
        raise SystemExit(f"parameter counts differ: vramlab {ours:,} vs meta build {theirs:,}")
    return {"vramlab_s": vram_median, "vramlab_all": vram_all, "accelerate_s": acc_median,
            "accelerate_all": acc_all, "speedup": acc_median / vram_median, "params": ours}


def bench_throughput() -> dict:
    spec = load_model("llama-2-7b")
    setups = [Setup(batch=b) for b in range(1, 65)]
    for i in range(WARMUP_ESTIMATES):
        estimate(spec, setups[i % 64])
    t0 = time.perf_counter()
    for i in range(TIMED_ESTIMATES):
        estimate(spec, setups[i % 64])
    elapsed = time.perf_counter() - t0
    return {"per_sec": TIMED_ESTIMATES / elapsed, "us_each": 1e6 * elapsed / TIMED_ESTIMATES}


def bench_fit() -> dict:
    spec = load_model("llama-2-7b")
    fit(spec, Setup(), 24 * GiB)  # warm-up: file reads, imports, caches
    times = []
    for _ in range(FIT_RUNS):
        t0 = time.perf_counter()
        result = fit(spec, Setup(), 24 * GiB)
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "ms_all": [1e3 * t for t in times],
            "max_batch": result.max_batch, "strategies": len(result.strategies)}


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    print(f"python {platform.python_version()} on {platform.machine()} ({platform.processor() or 'cpu'})")
    cold = bench_cold()
    thr = bench_throughput()
    fr = bench_fit()
    rows = [
        ("(a) cold `vramlab estimate llama-2-7b --json`", f"{cold['vramlab_s'] * 1e3:.0f} ms (median of "
         f"{COLD_RUNS_VRAMLAB})", "", ""),
        ("    accelerate-style meta build + sum", f"{cold['accelerate_s'] * 1e3:.0f} ms (median of "
         f"{COLD_RUNS_ACCELERATE})", "", ""),
        ("    speedup", f"{cold['speedup']:.1f}x", f">= {COLD_SPEEDUP_TARGET:.0f}x",
         _verdict(cold["speedup"] >= COLD_SPEEDUP_TARGET)),
        ("(b) in-process estimate() calls", f"{thr['per_sec']:,.0f}/s ({thr['us_each']:.0f} us each)",
         f">= {ESTIMATES_PER_SEC_TARGET:,}/s", _verdict(thr["per_sec"] >= ESTIMATES_PER_SEC_TARGET)),
        ("(c) fit(llama-2-7b, 24 GiB)", f"{fr['ms']:.1f} ms (median of {FIT_RUNS})",
         f"< {FIT_MS_TARGET:.0f} ms", _verdict(fr["ms"] < FIT_MS_TARGET)),
    ]
    widths = [max(len(r[i]) for r in rows + [("measure", "result", "target", "")]) for i in range(4)]
    header = ("measure", "result", "target", "")
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\nparams counted by both: {cold['params']:,}; cold runs (s): vramlab "
          f"{[round(t, 3) for t in cold['vramlab_all']]}, accelerate-style "
          f"{[round(t, 3) for t in cold['accelerate_all']]}; fit max_batch {fr['max_batch']}, "
          f"{fr['strategies']} strategies")
    ok = (cold["speedup"] >= COLD_SPEEDUP_TARGET and thr["per_sec"] >= ESTIMATES_PER_SEC_TARGET
          and fr["ms"] < FIT_MS_TARGET)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
