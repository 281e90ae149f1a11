"""QLoRA and bitsandbytes' 8-bit optimizers (issue 25): the preparation knob, the quantization
state and 8-bit optimizer state against bitsandbytes itself, real cpu steps against the
estimate, the sim against the cpu step to the byte, both build routes alike. Tests that need
bitsandbytes skip with the reason when it is not installed (pip install 'vramlab[quant]')."""
from __future__ import annotations

import subprocess
import sys

import pytest

from estimator.categories import TENSOR_CATEGORIES, Phase
from estimator.estimate import estimate
from estimator.modelspec import load_model
from estimator.optimizer import BNB_MIN_8BIT_SIZE, optimizer_state_bytes
from estimator.params import quant_state_bytes, quantized_tensors
from estimator.setup import KbitPrep, Precision, Quant, Setup

NO_BNB = "bitsandbytes is not installed (pip install 'vramlab[quant]'): QLoRA and 8-bit optimizers are not measured"
#: estimate vs a real cpu step, per phase (README "QLoRA"; the records in results/cpu-qlora/ are within 0.3 %)
PHASE_TOLERANCE = 0.01


def _bnb():
    return pytest.importorskip("bitsandbytes", reason=NO_BNB)


# --- the preparation knob (no bitsandbytes needed) -------------------------------------

def test_kbit_prep_resolves_as_trl_does():
    one = Setup(mode="qlora", quant="nf4")
    assert one.resolved_kbit_prep is KbitPrep.PEFT and one.stream_precision is Precision.FP32
    fsdp = Setup(mode="qlora", quant="nf4", world_size=2, sharding="fsdp")
    assert fsdp.resolved_kbit_prep is KbitPrep.NONE and fsdp.stream_precision is Precision.BF16
    assert Setup(mode="qlora", quant="nf4", world_size=2, sharding="ddp").resolved_kbit_prep is KbitPrep.PEFT
    explicit = Setup(mode="qlora", quant="nf4", world_size=2, sharding="fsdp", kbit_prep="peft")
    assert explicit.resolved_kbit_prep is KbitPrep.PEFT
    # autocast keeps casting as before: the fp32-loaded amp recipe's stream is its own
    assert Setup(mode="qlora", quant="nf4", precision="amp-bf16").stream_precision is Precision.AMP_BF16
    assert Setup(mode="lora").resolved_kbit_prep is KbitPrep.NONE


def test_kbit_prep_outside_qlora_is_refused():
    with pytest.raises(ValueError, match="applies to --mode qlora"):
        Setup(mode="lora", kbit_prep="peft")
    with pytest.raises(ValueError, match="unknown kbitprep"):
        Setup(mode="qlora", quant="nf4", kbit_prep="trl")


def test_kbit_prep_keeps_record_keys():
    assert "kbit_prep" not in Setup(mode="qlora", quant="nf4").to_dict()
    assert Setup(mode="qlora", quant="nf4", kbit_prep="none").to_dict()["kbit_prep"] == "none"
    # auto and its resolution are one cache key
    assert Setup(mode="qlora", quant="nf4").shape_free is Setup(mode="qlora", quant="nf4", kbit_prep="peft").shape_free
    assert Setup.from_dict(Setup(mode="qlora", quant="nf4", kbit_prep="none").to_dict()).kbit_prep is KbitPrep.NONE


def test_preparation_makes_the_stream_fp32():
    """peft's fp32 casts: the unquantized parameters (the embedding here) and the logits in
    fp32; without preparation bf16 (what the stream dtype followed before)."""
    spec = load_model("smollm2-135m")
    base = dict(mode="qlora", quant="nf4-dq", seq=512, device="cpu")
    peft, none = estimate(spec, Setup(**base)), estimate(spec, Setup(**base, kbit_prep="none"))
    embed = spec.vocab_size * spec.hidden_size
    weights = lambda e: e.phases[e.peak_phase][next(c for c in TENSOR_CATEGORIES if c.value == "weights")]
    assert weights(peft) - weights(none) == pytest.approx(2 * embed, rel=0.05)
    # the forward's end: fp32 logits need no fp32 copy for the loss (its log-softmax beside them)
    forward_logits = lambda e: next(v for c, v in e.phases[Phase.FORWARD].items() if c.value == "logits")
    tv = 512 * spec.vocab_size
    assert forward_logits(peft) == (4 + 4) * tv
    assert forward_logits(none) == (2 + 4 + 4) * tv
    assert peft.allocated_bytes > none.allocated_bytes


def test_paged_state_leaves_the_allocator_on_cuda():
    """PagedAdamW8bit's buffers of tensors of >= 1e5 values are unified memory on CUDA (outside
    max_memory_allocated, inside NVML's figure); on CPU paging is off."""
    spec = load_model("smollm2-135m")
    base = dict(mode="full", precision="bf16", seq=128)
    plain = estimate(spec, Setup(**base, optimizer="adamw-8bit"))
    paged = estimate(spec, Setup(**base, optimizer="paged-adamw-8bit"))
    moved = paged.non_tensor["paged_optimizer_state"]["bytes"]
    assert moved > 0 and "paged_optimizer_state" not in plain.non_tensor
    # the state buffers leave the allocator's tensors (and its segments) for NVML's side
    assert paged.allocated_bytes == plain.allocated_bytes - moved
    assert paged.reserved_bytes < plain.reserved_bytes
    assert paged.total_bytes == paged.reserved_bytes + sum(s["bytes"] for s in paged.non_tensor.values())
    cpu = dict(base, device="cpu")
    assert estimate(spec, Setup(**cpu, optimizer="paged-adamw-8bit")).phases == \
        estimate(spec, Setup(**cpu, optimizer="adamw-8bit")).phases


def test_main_job_imports_no_bitsandbytes():
    """The estimator and the profiler's CLI load without bitsandbytes (it is an extra)."""
    code = ("import sys; import profiler.cli, profiler.measure.run, estimator.estimate; "
            "sys.exit(1 if 'bitsandbytes' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_missing_bitsandbytes_is_one_sentence(monkeypatch):
    from profiler.measure.build import SetupUnavailable, build_model
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(SetupUnavailable, match="needs bitsandbytes, which is not installed"):
        build_model(load_model("smollm2-135m"), Setup(mode="qlora", quant="nf4", device="cpu"), "cpu")


# --- against bitsandbytes itself -------------------------------------------------------

@pytest.mark.parametrize("quant", [Quant.NF4, Quant.NF4_DQ, Quant.FP4])
def test_quant_state_bytes_match_bitsandbytes(quant):
    """Every quantized tensor's state (absmax, codes, offset, nested absmax) as bitsandbytes
    0.50 makes it, summed over a model's shapes."""
    bnb = _bnb()
    import torch
    spec = load_model("smollm2-135m")
    measured = 0
    for elems, rows, count in quantized_tensors(spec):
        w = torch.zeros(rows, elems // rows, dtype=torch.bfloat16)
        _, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=quant is Quant.NF4_DQ,
                                             quant_type="fp4" if quant is Quant.FP4 else "nf4")
        states = [qs, qs.state2] if qs.nested else [qs]
        per = sum(t.untyped_storage().nbytes() for s in states for t in (s.absmax, s.code, s.offset)
                  if isinstance(t, torch.Tensor))
        measured += per * count
    assert quant_state_bytes(spec, quant, True) == measured


def test_8bit_optimizer_state_matches_bitsandbytes():
    """AdamW8bit's state per tensor, on both sides of min_8bit_size = 4096 values: uint8 states
    and an fp32 absmax per 256 values, the two shared maps; fp32 states below."""
    bnb = _bnb()
    import torch
    sizes = [BNB_MIN_8BIT_SIZE - 1, BNB_MIN_8BIT_SIZE, 3 * 4096 + 7, 576]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    seen, measured = set(), 0
    for state in opt.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                measured += t.untyped_storage().nbytes()
    setup = Setup(mode="full", precision="fp32", optimizer="adamw-8bit", device="cpu")
    assert optimizer_state_bytes(load_model("smollm2-135m"), setup, sum(sizes), 4, sizes) == measured


# --- real cpu steps (slow) -------------------------------------------------------------

def _phases(record) -> dict[str, int]:
    return {ph: m.peak_allocated_bytes for ph, m in record.measured.phases.items()}


def _check_against_estimate(record) -> None:
    assert record.ok, record.message
    tensors = {c.value for c in TENSOR_CATEGORIES}
    for ph, m in record.measured.phases.items():
        if ph not in record.predicted.phases:
            continue
        est = sum(v for k, v in record.predicted.phases[ph].items() if k in tensors)
        assert est / m.peak_allocated_bytes - 1 == pytest.approx(0, abs=PHASE_TOLERANCE), ph


QUICK = dict(mode="qlora", batch=1, seq=64, device="cpu", lora_targets="q_proj,v_proj")


@pytest.mark.slow
@pytest.mark.parametrize("changes", [dict(quant="nf4-dq"), dict(quant="nf4", kbit_prep="none"),
                                     dict(quant="nf4-dq", optimizer="adamw-8bit", grad_ckpt=True)],
                         ids=["nf4-dq-peft", "nf4-none", "8bit-adamw-ckpt"])
def test_qlora_cpu_step_matches_estimate_and_sim(changes):
    """A real QLoRA step on CPU (bitsandbytes' 4-bit layers) within the tolerance per phase of
    the estimate, and the sim with CPU semantics equal to it to the byte in every phase."""
    _bnb()
    from profiler.measure.run import run_case
    setup = Setup(**QUICK, **changes)
    real = run_case("smollm2-135m", setup, "cpu", steps=1)
    _check_against_estimate(real)
    fake = run_case("smollm2-135m", setup, "sim", steps=1)
    assert fake.ok, fake.message
    assert _phases(fake) == _phases(real)
    assert fake.measured.first_step and {k: v.peak_allocated_bytes for k, v in fake.measured.first_step.items()} == \
        {k: v.peak_allocated_bytes for k, v in real.measured.first_step.items()}


@pytest.mark.slow
def test_both_build_routes_measure_alike():
    """from_pretrained with the quantization config, and transformers' own linear swap on the
    built model: the same modules, the same bytes in every phase."""
    _bnb()
    from profiler.measure import build
    from profiler.measure.run import run_case
    setup = Setup(**QUICK, quant="nf4-dq")
    loaded = run_case("smollm2-135m", setup, "cpu", steps=1)
    original = build.build_model
    build_swap = lambda spec, s, device, route="load": original(spec, s, device, route="swap")  # noqa: E731
    import profiler.measure.run as run_module
    try:
        run_module.build_model = build_swap
        swapped = run_case("smollm2-135m", setup, "cpu", steps=1)
    finally:
        run_module.build_model = original
    assert loaded.ok and swapped.ok
    assert _phases(loaded) == _phases(swapped)


@pytest.mark.slow
def test_int8_qlora_cpu_step_matches_estimate():
    """LLM.int8 layers on CPU (MatMul8bitFp saves each 8-bit linear's input)."""
    _bnb()
    from profiler.measure.run import run_case
    _check_against_estimate(run_case("smollm2-135m", Setup(**QUICK, quant="int8"), "cpu", steps=1))


@pytest.mark.slow
def test_sim_runs_qlora_with_cuda_semantics():
    """The sim builds QLoRA on meta and steps it on fake tensors with CUDA semantics (the
    dequantized weight of CUDA's fallback gemm), near the estimate."""
    _bnb()
    from profiler.measure.run import run_case
    setup = Setup(mode="qlora", quant="nf4-dq", batch=1, seq=256)
    record = run_case("smollm2-135m", setup, "sim", steps=1)
    _check_against_estimate(record)


def test_old_peft_casts_the_16bit_packed_storage():
    """peft < 0.10 casts every 16-bit parameter to fp32, the packed weights in a bf16
    bnb_4bit_quant_storage too (sharded QLoRA with an explicit peft preparation): twice their
    bytes, sharded like them; 0.10 skips Params4bit (estimator/versions.py)."""
    from estimator.params import quantized_params
    spec = load_model("llama-2-7b")
    base = dict(mode="qlora", quant="nf4", world_size=2, sharding="fsdp", kbit_prep="peft")
    weights = lambda v: next(b for c, b in estimate(spec, Setup(**base, versions=v)).phases[Phase.OPTIMIZER].items()
                             if c.value == "weights")
    packed = quantized_params(spec)[0] // 2
    assert weights("peft=0.9.0") - weights("peft=0.10.0") == pytest.approx(packed / 2, rel=1e-3)
    single = dict(mode="qlora", quant="nf4")  # uint8 storage on one device: nothing to cast
    assert estimate(spec, Setup(**single, versions="peft=0.9.0")).phases == \
        estimate(spec, Setup(**single, versions="peft=0.10.0")).phases
