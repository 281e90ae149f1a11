"""Case labels tell cases apart, and the quick matrix covers every workload knob the
README names (issue 28: ``gpt2 full fp32 b1x32 sdpa`` three times in one loop)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from estimator.cli_args import setup_from_args
from estimator.setup import Setup
from profiler.analysis.pipeline import QUICK_MATRIX
from profiler.cli import build_parser
from profiler.record import Case, read_records
from profiler.sweeps.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]


def _case(model: str, setup: Setup, backend: str = "cpu") -> Case:
    if backend == "cpu":
        setup = setup.replace(device="cpu")  # what sweep --backend cpu records
    return Case(model, None, setup.to_dict(), 1, backend)


def test_labels_are_unique_over_the_quick_matrix():
    labels = [_case(model, setup).label() for model, setup, _ in load_matrix(QUICK_MATRIX)]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    assert not twice, twice


#: A value other than the default for every Setup field (what a label must show).
OTHER = {"mode": "lora", "precision": "amp-bf16", "quant": "nf4", "optimizer": "sgd", "optimizer_impl": "fused",
         "batch": 3, "seq": 77, "grad_ckpt": True, "attn": "eager", "lora_rank": 8, "lora_alpha": 4,
         "lora_targets": ["c_attn"], "device": "cpu", "world_size": 4, "sharding": "fsdp", "new_tokens": 5,
         "loop": "held", "grad_accum": 2, "keep_grads": True, "use_cache": True, "loss": "logits-sum",
         "trainer": "sft", "ref_model": "separate", "packing": "packed",
         "num_generations": 4, "max_completion": 64, "num_iterations": 2, "beta": 0.04,
         "versions": [["transformers", "4.48"]], "compute_capability": "7.5",
         "allow_llama_fallback": True,
         "alloc_conf": "expandable_segments:True", "empty_cache_steps": 1, "load": "config",
         "rope_scaling": 4.0, "kbit_prep": "none", "fsdp_wrap": "layers"}


def test_every_setup_field_has_a_different_value_above():
    assert set(OTHER) == set(Setup.__dataclass_fields__)


@pytest.mark.parametrize("field", sorted(OTHER))
def test_a_label_shows_every_field_that_differs_from_the_default(field):
    base = Setup().to_dict()
    changed = dict(base, **{field: OTHER[field]})
    assert Case("gpt2", None, changed, 1, "sim").label() != Case("gpt2", None, base, 1, "sim").label()


def test_the_device_is_named_only_where_it_is_not_the_backends_own():
    cpu = Setup(device="cpu").to_dict()
    assert "cpu" not in Case("gpt2", None, cpu, 1, "cpu").label().split()
    assert "device=cpu" in Case("gpt2", None, cpu, 1, "sim").label()


def _readme_knobs() -> list[list[str]]:
    """The flags of each ``vramlab estimate gpt2 ...`` line under the README's "Workload knobs"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("Workload knobs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [re.split(r"\s+#", line, maxsplit=1)[0].split()[3:] for line in block.strip().splitlines()]


def test_the_readme_names_nine_workload_knobs():
    assert len(_readme_knobs()) == 9


@pytest.mark.parametrize("flags", _readme_knobs(), ids=" ".join)
def test_the_quick_matrix_has_a_case_for_every_readme_knob(flags):
    args = build_parser().parse_args(["estimate", "gpt2", *flags])
    default = Setup().to_dict()
    knob = {k: v for k, v in setup_from_args(args).to_dict().items() if default.get(k) != v}
    assert knob, flags

    def covers(case: dict, name: str, value) -> bool:  # a count (--grad-accum 4): any other than 1
        count = isinstance(value, int) and not isinstance(value, bool)
        return case.get(name, default.get(name)) != default.get(name) if count else case.get(name) == value

    cases = [setup.to_dict() for _, setup, _ in load_matrix(QUICK_MATRIX)]
    assert any(all(covers(case, k, v) for k, v in knob.items()) for case in cases), knob


@pytest.mark.parametrize("path", ["results/cpu/cpu-quick.jsonl", "results/cuda/h200/cuda-standard.jsonl",
                                  "results/sim/sim-large.jsonl"])
def test_labels_are_unique_in_the_committed_records(path):
    labels = [r.label for r in read_records(ROOT / path)]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    assert not twice, twice
