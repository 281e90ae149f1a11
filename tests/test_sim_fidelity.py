"""The sim backend allocates what a real step allocates.

With CPU semantics (``device="cpu"``) a sim step and a real cpu step must be equal to the
byte, phase by phase and category by category. The shapes are the shipped SmolLM2-135M
and Qwen2.5-0.5B layers (their heads, GQA ratio, widths, biases and tied embeddings) at 8
layers and a 4,096-token vocabulary, stepped at seq 512: the depth and length that make
per-layer and per-token terms show, at a cost a CI machine can pay.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator.setup import Setup
from profiler.measure.run import run_case

ROOT = Path(__file__).resolve().parents[1]
LAYERS, VOCAB, SEQ = 8, 4096, 512


def _shape(tmp_path_factory, model: str) -> str:
    config = json.loads((ROOT / "estimator" / "data" / "models" / f"{model}.json").read_text())
    config.update(num_hidden_layers=LAYERS, vocab_size=VOCAB)
    config.pop("_vramlab_source", None)
    path = tmp_path_factory.mktemp("shapes") / f"{model}-{LAYERS}l.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return {m: _shape(tmp_path_factory, m) for m in ("smollm2-135m", "qwen2.5-0.5b")}


def _measured(record) -> dict:
    return {phase: (v.peak_allocated_bytes, v.start_bytes, v.end_bytes, v.categories)
            for phase, v in record.measured.phases.items()}


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-0.5b"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode,ckpt", [("full", False), ("full", True), ("lora", False), ("lora", True)])
def test_sim_equals_cpu_to_the_byte_with_sdpa_and_gqa(shapes, model, precision, mode, ckpt):
    setup = Setup(mode=mode, precision=precision, seq=SEQ, grad_ckpt=ckpt, attn="sdpa", device="cpu")
    cpu = run_case(shapes[model], setup, "cpu", steps=1)
    sim = run_case(shapes[model], setup, "sim", steps=1)
    assert cpu.ok and sim.ok, (cpu.message, sim.message)
    assert _measured(sim) == _measured(cpu)
