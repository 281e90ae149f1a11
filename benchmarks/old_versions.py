"""Real CPU steps under an older transformers, for results/versions/transformers-<v>/.

Run with the interpreter of a venv holding that transformers (torch 2.13 CPU, this repo
installed with ``pip install -e . --no-deps``), e.g.::

    /work/venv442/bin/python benchmarks/old_versions.py gpt2

Each case is the published benchmarks' workload (no optimizer, ``logits.sum()``, the
outputs held until the next forward, the model's KV cache on) at a CPU-sized shape; the
estimate is made under the installed versions (estimator/versions.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import transformers

from estimator.setup import Setup
from profiler.measure.run import run_case
from profiler.record import append_record

WORKLOAD = dict(precision="fp32", batch=2, seq=256, optimizer="none", loss="logits-sum", loop="held",
                use_cache=True, device="cpu")
#: (model, attention[, setup overrides]) per family. GPT-NeoX also in bf16: before 4.45 its fp32
#: rotary tables promote a 16-bit model's q and k (Semantics.gpt_neox_fp32_rotary). BioGPT's
#: sdpa class first ships in 4.45 (run it under 4.46.0, the same BioGPT code as 4.45.2).
CASES = {"gpt2": [("gpt2", "eager"), ("gpt2", "sdpa")], "opt": [("opt-125m", "eager"), ("opt-125m", "sdpa")],
         "gpt_neox": [("pythia-70m", "eager"), ("pythia-70m", "sdpa"), ("pythia-70m", "eager", dict(precision="bf16")),
                      ("pythia-70m", "sdpa", dict(precision="bf16"))],
         "biogpt": [("biogpt", "eager"), ("biogpt", "sdpa")]}


def main(family: str) -> None:
    out = Path(__file__).resolve().parents[1] / "results" / "versions" / \
        f"transformers-{transformers.__version__}" / "cpu-steps.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for model, attn, *extra in CASES[family]:
        record = run_case(model, Setup(**{**WORKLOAD, **(extra[0] if extra else {})}, attn=attn), "cpu", steps=1)
        append_record(out, record)
        m, p = record.measured.peak_allocated_bytes, record.predicted.allocated_bytes
        print(f"{model} {attn}: {record.status} measured {m} predicted {p} ({(p - m) / m:+.3%})")


if __name__ == "__main__":
    main(sys.argv[1])
