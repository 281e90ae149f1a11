"""Measure the real DPOTrainer's CPU steps of issue 24's DPO table, one record per case.

Each case runs ``profiler.measure.run.run_case`` on the cpu backend (the real ``trl.DPOTrainer``,
profiler/measure/dpo_steps.py; fp32, batch 1, seq 512, DPOConfig's checkpointing, 1 + 1 optimizer
steps), prints every phase beside its estimate and appends the record to OUT; the table is
``python benchmarks/trl_before_after.py OUT``. Indices pick cases (default: all).

    PYTHONPATH=. python benchmarks/trl_dpo_records.py OUT.jsonl [INDEX ...]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.categories import TENSOR_CATEGORIES  # noqa: E402
from estimator.setup import Setup  # noqa: E402
from profiler.measure.run import run_case  # noqa: E402
from profiler.record import append_record  # noqa: E402

#: (model, mode, reference, LoRA targets): three architectures (Llama-style SmolLM2-135M, Qwen3-0.6B's
#: width and 151,936 vocabulary at 4 of its 28 layers, GPT-2), every reference
CASES = [
    ("smollm2-135m", "full", "separate", None),
    ("smollm2-135m", "full", "precomputed", None),
    ("smollm2-135m", "lora", "adapter", "q_proj,v_proj"),
    ("smollm2-135m", "lora", "separate", "q_proj,v_proj"),
    ("results/trl/qwen3-0.6b-4l.json", "full", "separate", None),
    ("results/trl/qwen3-0.6b-4l.json", "lora", "adapter", "q_proj,v_proj"),
    ("gpt2", "lora", "adapter", "c_attn"),
    ("gpt2", "full", "precomputed", None),
]
_TENSORS = {c.value for c in TENSOR_CATEGORIES}


def main(out: str, only: set[int]) -> None:
    for i, (model, mode, ref, targets) in enumerate(CASES):
        if only and i not in only:
            continue
        kw = dict(lora_targets=targets) if targets else {}
        setup = Setup(trainer="dpo", loss="chunked-nll", ref_model=ref, mode=mode, precision="fp32", batch=1,
                      seq=512, grad_ckpt=True, device="cpu", **kw)
        t = time.time()
        r = run_case(model, setup, "cpu", steps=1)
        print(i, model, mode, ref, r.status.value, r.message, f"{time.time() - t:.1f} s", flush=True)
        if not r.ok:
            continue
        for first in (False, True):
            measured, predicted = (r.measured.first_step if first else r.measured.phases), r.predicted.phases_of(first)
            for phase, m in measured.items():
                if phase not in predicted:
                    continue
                want = sum(v for c, v in predicted[phase].items() if c in _TENSORS)
                got = m.peak_allocated_bytes
                print(f"   {'first' if first else 'steady'} {phase}: measured {got}, estimate {want} "
                      f"({100 * (want - got) / got:+.3f} %)", flush=True)
        append_record(out, r)


if __name__ == "__main__":
    main(sys.argv[1], {int(i) for i in sys.argv[2:]})
