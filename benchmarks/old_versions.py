"""Real CPU steps under an older transformers, for results/versions/transformers-<v>/.

Run with the interpreter of a venv holding that transformers (torch 2.13 CPU, this repo
installed with ``pip install -e . --no-deps``), e.g.::

    /work/venv442/bin/python benchmarks/old_versions.py gpt2
    /work/venv442/bin/python benchmarks/old_versions.py prefill

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
#: rotary tables promote a 16-bit model's q and k (estimator/archs/gpt_neox.py rotary_fp32). BioGPT's
#: sdpa class first ships in 4.45 (run it under 4.46.0, the same BioGPT code as 4.45.2).
CASES = {"gpt2": [("gpt2", "eager"), ("gpt2", "sdpa")], "opt": [("opt-125m", "eager"), ("opt-125m", "sdpa")],
         "gpt_neox": [("pythia-70m", "eager"), ("pythia-70m", "sdpa"), ("pythia-70m", "eager", dict(precision="bf16")),
                      ("pythia-70m", "sdpa", dict(precision="bf16"))],
         "biogpt": [("biogpt", "eager"), ("biogpt", "sdpa")]}


#: ``prefill``: generate's no-grad prefill (the last position's logits where the forward takes
#: ``logits_to_keep``; every position's before; the families' prefill_full_logits and rotary_tables_per_layer switches)
PREFILL = dict(mode="inference", batch=2, seq=512, device="cpu")
#: (model, precision, attention): OPT has no sdpa class before 4.46, so eager throughout
PREFILL_CASES = [("smollm2-135m", "bf16", "sdpa"), ("qwen2.5-0.5b", "bf16", "sdpa"), ("gpt2", "fp32", "sdpa"),
                 ("opt-125m", "fp32", "eager")]


def main(family: str) -> None:
    folder = Path(__file__).resolve().parents[1] / "results" / "versions" / f"transformers-{transformers.__version__}"
    out = folder / ("cpu-prefill.jsonl" if family == "prefill" else "cpu-steps.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if family == "prefill":
        cases = [(model, Setup(**PREFILL, precision=precision, attn=attn)) for model, precision, attn in PREFILL_CASES]
    else:
        cases = [(model, Setup(**{**WORKLOAD, **(extra[0] if extra else {})}, attn=attn))
                 for model, attn, *extra in CASES[family]]
    for model, setup in cases:
        record = run_case(model, setup, "cpu", steps=1)
        append_record(out, record)
        m, p = record.measured.peak_allocated_bytes, record.predicted.allocated_bytes
        error = f"({(p - m) / m:+.3%})" if record.ok else record.message
        print(f"{model} {setup.attn} {setup.mode}: {record.status} measured {m} predicted {p} {error}")


if __name__ == "__main__":
    main(sys.argv[1])
