"""Long sequences with eager attention (issue 29): the scores, the softmax's fp32 copy and
output, the eager mask, a checkpointed layer's forward and its recomputation in backward,
against the CUDA-semantics sim at 4096 tokens (where the (heads, s, s) terms dominate)."""
from __future__ import annotations

from pathlib import Path

import pytest

from estimator.categories import TENSOR_CATEGORIES, Phase
from estimator.modelspec import load_model, spec_from_config
from estimator.setup import Setup
from profiler.measure.run import run_case
from profiler.record import read_records

#: estimate vs the sim per phase at s4096, eager: measured within 1.2 % (SmolLM2-360M, 32
#: layers: -0.25 % prefill, -1.42 % eval, LoRA+ckpt fp16 -0.26 %, full bf16 ckpt -1.12 %)
LONG_TOLERANCE = 0.02
_T = {c.value for c in TENSOR_CATEGORIES}


def _spec(layers: int = 6):
    spec = load_model("smollm2-360m")
    return spec_from_config(dict(spec.config, num_hidden_layers=layers), name=f"smollm2-360m-{layers}l",
                            source=spec.source)


@pytest.mark.parametrize("kw", [
    dict(mode="inference", precision="fp16"),
    dict(mode="eval", precision="fp16"),
    dict(mode="lora", precision="fp16", grad_ckpt=True, lora_targets="q_proj,v_proj"),
    dict(mode="lora", precision="fp32", grad_ckpt=True, lora_targets="q_proj,v_proj"),
    dict(mode="full", precision="bf16", grad_ckpt=True),
], ids=lambda kw: f"{kw['mode']}-{kw['precision']}{'-ckpt' if kw.get('grad_ckpt') else ''}")
def test_eager_at_4096_tokens_against_the_sim(kw):
    spec = _spec()
    record = run_case(spec.name, Setup(attn="eager", batch=1, seq=4096, **kw), "sim", steps=1, spec=spec)
    assert record.ok, record.message
    for phase, m in record.measured.phases.items():
        if phase == Phase.ZERO_GRAD.value:
            continue
        pred = sum(v for k, v in record.predicted.phases[phase].items() if k in _T)
        assert abs(pred - m.peak_allocated_bytes) <= LONG_TOLERANCE * m.peak_allocated_bytes, \
            (phase, pred, m.peak_allocated_bytes, (pred - m.peak_allocated_bytes) / m.peak_allocated_bytes)


#: decode at a long prompt vs the sim: measured within 0.2 % (before: -6.7 % eager with grouped
#: heads on a real CPU step at 4096 tokens, +2 % to +3.6 % for 2-layer models without grouping,
#: -2.8 % for CUDA's fp32 math kernel)
DECODE_TOLERANCE = 0.005
#: ... and for a model whose layers all slide (2 layers of Gemma 3 1B): +0.55 % measured, the
#: estimate high by half a layer's cache: a sliding layer's cache is a view of its last
#: window (5.24 cache_utils.py:246-247), so the prompt's storage stays until the first decode
#: step and its concatenation makes window-sized tensors, not prompt-sized ones (not modelled:
#: with any full-attention layer, as in every Gemma 3, the full layer's concatenation decides)
SLIDING_DECODE_TOLERANCE = 0.01


@pytest.mark.parametrize("name,device,precision,seq,attn", [
    ("smollm2-360m", "cpu", "fp32", 4096, "eager"),   # grouped heads: repeat_kv copies the whole cache
    ("smollm2-360m", "cuda", "bf16", 4096, "eager"),
    ("opt-125m", "cuda", "fp16", 2000, "eager"),      # no grouping: the cache's concatenation decides
    ("gemma-3-1b", "cuda", "bf16", 4096, "eager"),    # sliding layers only: their window (see above)
    ("smollm2-360m", "cuda", "fp32", 2048, "sdpa"),   # CUDA's fp32 math kernel for grouped heads
])
def test_decode_after_a_long_prompt_against_the_sim(name, device, precision, seq, attn):
    spec = load_model(name)
    cfg = dict(spec.config)
    cfg["num_hidden_layers"] = 2
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:2]
    spec = spec_from_config(cfg, name=f"{name}-2l", source=spec.source)
    setup = Setup(mode="inference", precision=precision, device=device, attn=attn, batch=2, seq=seq, new_tokens=4)
    record = run_case(spec.name, setup, "sim", steps=1, spec=spec)
    assert record.ok, record.message
    m = record.measured.phases[Phase.DECODE.value]
    pred = sum(v for k, v in record.predicted.phases[Phase.DECODE.value].items() if k in _T)
    tolerance = SLIDING_DECODE_TOLERANCE if name == "gemma-3-1b" else DECODE_TOLERANCE
    assert abs(pred - m.peak_allocated_bytes) <= tolerance * m.peak_allocated_bytes, \
        (pred, m.peak_allocated_bytes, (pred - m.peak_allocated_bytes) / m.peak_allocated_bytes)


def test_a_gpu_preset_carries_its_compute_capability_into_the_kernel_choice(cli):
    import json

    from estimator.kernels import cuda_sdpa_backend
    out = cli("estimate", "gpt2", "--precision", "fp16", "--gpu", "t4", "--json")
    assert out.code == 0, out.err
    setup = Setup.from_dict(json.loads(out.out)["setup"])
    assert setup.compute_capability == "7.5"  # Turing: no flash attention for torch >= 2.2
    spec = load_model("gpt2")
    assert cuda_sdpa_backend(spec, setup) == "efficient"
    assert cuda_sdpa_backend(spec, setup.replace(compute_capability="8.0")) == "fused"
    # grouped heads: the memory-efficient kernel takes no enable_gqa, so sm75 falls to math
    assert cuda_sdpa_backend(load_model("smollm2-360m"), setup) == "math"


def test_contexts_past_the_config_need_a_rope_scaling_that_covers_them():
    from estimator.estimate import estimate
    llama = load_model("llama-2-7b")  # max_position_embeddings 4096, no rope scaling
    with pytest.raises(ValueError, match=r"beyond llama-2-7b's 4096 positions .*--rope-scaling"):
        estimate(llama, Setup(seq=8192))
    longer = estimate(llama, Setup(seq=8192, rope_scaling=2))
    assert longer.allocated_bytes > estimate(llama, Setup(seq=4096)).allocated_bytes
    with pytest.raises(ValueError, match="beyond llama-2-7b's 8192 positions"):
        estimate(llama, Setup(seq=8193, rope_scaling=2))
    # a config's own linear scaling stretches it; learned positions never stretch
    scaled = spec_from_config(dict(llama.config, rope_scaling={"rope_type": "linear", "factor": 4.0}), name="x")
    estimate(scaled, Setup(seq=16384))
    with pytest.raises(ValueError, match="its learned position table"):
        estimate(load_model("gpt2"), Setup(seq=2048, rope_scaling=4))
    with pytest.raises(ValueError, match="rope scaling must be a factor"):
        Setup(rope_scaling=-1)
    assert "rope_scaling" not in Setup().to_dict()  # records keep their case keys


#: sdpa's math kernel at long sequence vs the sim, which runs the kernel the named GPU's
#: dispatcher picks (sim.target_for): grouped heads in fp32 on any GPU, and in fp16 on a
#: Turing card (no flash or cuDNN attention). Measured within 0.85 % per phase; before the
#: kernel's causal mask, fp32 upcasts and backward score matrices were modelled: LoRA with
#: checkpointing -18.7 % (fp32) and -20.4 % (fp16 sm75) in backward, prefill -3.2 / -4.2 %
MATH_TOLERANCE = 0.01


@pytest.mark.parametrize("precision,cc", [("fp32", ""), ("fp16", "7.5")])
@pytest.mark.parametrize("kw", [dict(mode="inference"), dict(mode="lora", grad_ckpt=True)],
                         ids=["prefill", "lora-ckpt"])
def test_the_math_kernel_at_4096_tokens_against_the_sim(precision, cc, kw):
    spec = _spec(4)
    setup = Setup(attn="sdpa", precision=precision, compute_capability=cc, batch=1, seq=4096, **kw)
    from estimator.kernels import cuda_sdpa_backend
    assert cuda_sdpa_backend(spec, setup) == "math"
    record = run_case(spec.name, setup, "sim", steps=1, spec=spec)
    assert record.ok, record.message
    for phase, m in record.measured.phases.items():
        if phase == Phase.ZERO_GRAD.value:
            continue
        pred = sum(v for k, v in record.predicted.phases[phase].items() if k in _T)
        assert abs(pred - m.peak_allocated_bytes) <= MATH_TOLERANCE * m.peak_allocated_bytes, \
            (phase, pred, m.peak_allocated_bytes, (pred - m.peak_allocated_bytes) / m.peak_allocated_bytes)


def test_the_math_kernels_own_memory_measured_on_the_op():
    """What the estimate takes from the math kernel, measured with the storage tracker on
    the aten op alone (fp16, grouped heads): at the softmax two (heads, s, s) fp32 scores,
    the fp32 (s, s) causal mask and 4 q + 2 kv fp32 per token (kernels.math_kernel_extra
    with the 3 q prefill_transient counts); in backward two more score matrices over what it
    saved (sharding._working_terms)."""
    import torch

    from profiler.measure.tracker import StorageTracker
    b, a, kvh, s, d = 1, 15, 5, 512, 64
    q = torch.randn(b, a, s, d, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, kvh, s, d, dtype=torch.float16, requires_grad=True) for _ in range(2))
    square, qf, kvf = 4 * a * s * s, 4 * a * d * b * s, 4 * kvh * d * b * s
    math = torch.ops.aten._scaled_dot_product_attention_math
    tracker = StorageTracker()
    with tracker:
        with torch.no_grad():  # a prefill's layer (its output is made after the peak)
            math(q, k, v, None, 0.0, True, enable_gqa=True)
        assert tracker.peak_bytes == 2 * square + 4 * s * s + 4 * qf + 2 * kvf
        out = math(q, k, v, None, 0.0, True, enable_gqa=True)[0]
        grad = torch.ones_like(out)
        held = tracker.current_bytes
        tracker.reset_peak()
        out.backward(grad)
        assert tracker.peak_bytes - held == 2 * square


def test_a_turing_target_runs_16_bit_sdpa_without_flash():
    from profiler.measure.sim import target_for
    assert target_for(Setup(compute_capability="7.5")).flash is False
    ampere = target_for(Setup(compute_capability="8.6"))
    assert ampere.flash and not ampere.cudnn_first
    assert target_for(Setup()).architecture == "hopper"


#: real CPU steps at 2k-8k tokens (results/cpu-long, 20 cases of four families: full, LoRA and
#: QLoRA, eager and sdpa, with and without checkpointing) vs today's estimate, every phase: measured
#: within 0.79 % (before the eager mask held by the checkpoint and the final norm freed before the
#: layers' backward: QLoRA eager ckpt -1.64 %, Qwen3 QLoRA forward -1.53 %, OLMo-2 LoRA -1.03 %)
LONG_CPU_RECORDS = Path(__file__).resolve().parents[1] / "results" / "cpu-long" / "long-cpu.jsonl"
LONG_CPU_TOLERANCE = 0.01


@pytest.mark.parametrize("record", read_records(LONG_CPU_RECORDS), ids=lambda r: r.label)
def test_committed_long_cpu_steps_agree_with_the_estimate(record, agrees_per_phase):
    agrees_per_phase(record, LONG_CPU_TOLERANCE)


#: the CUDA-semantics sim at 2k-8k tokens (results/sim/long-sim.jsonl: three families, eager full /
#: LoRA / QLoRA with and without checkpointing, sdpa on sm75 / sm80 / sm90) vs today's estimate,
#: every phase: measured within 0.42 % (before the checkpointed eager mask: Gemma 3 QLoRA -1.60 %)
LONG_SIM_TOLERANCE = 0.01
LONG_SIM_RECORDS = Path(__file__).resolve().parents[1] / "results" / "sim" / "long-sim.jsonl"


@pytest.mark.parametrize("record", read_records(LONG_SIM_RECORDS), ids=lambda r: r.label)
def test_committed_long_sim_steps_agree_with_the_estimate(record, agrees_per_phase):
    agrees_per_phase(record, LONG_SIM_TOLERANCE)
