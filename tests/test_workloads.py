"""Workloads as users run them: the loop style, gradient accumulation, kept gradients, an
evaluation forward and a training forward with a KV cache, first step and steady state.

Each knob is checked three ways: the estimator's arithmetic for what the knob adds, the
estimate against real CPU steps (the cpu backend, exact tensor bytes) and against the
CUDA-semantics sim, per phase, in steady state and in the first step."""
from __future__ import annotations

import json

import pytest

from estimator.categories import TENSOR_CATEGORIES, Category, Phase
from estimator.estimate import estimate, kv_cache_bytes
from estimator.modelspec import load_model
from estimator.setup import Loop, Mode, Setup
from profiler.analysis.validate import validate
from profiler.measure.run import run_case

#: The issue's bound for every knob, estimate vs measurement per phase. Measured (torch
#: 2.13, transformers 5.24): within 0.2 % on the cpu backend and 0.1 % on the sim.
KNOB_TOLERANCE = 0.01
SEQ = 512  # realistic: the issue asks for seq >= 512 and >= 100M parameters

KNOBS = {
    "manual": dict(loop="manual"),
    "grad_accum": dict(grad_accum=2),
    "keep_grads": dict(keep_grads=True),
    "eval": dict(mode="eval"),
    "eval_no_loss": dict(mode="eval", loss="none"),
    "use_cache": dict(use_cache=True),
}


def _tensors(phase: dict) -> int:
    return sum(v for k, v in phase.items() if Category(k) in TENSOR_CATEGORIES)


def _assert_phases_agree(record) -> None:
    """Every measured phase of steady state and of the first step within KNOB_TOLERANCE."""
    assert record.ok, record.message
    predicted = record.predicted
    pairs = [(record.measured.phases, predicted.phases_of(False), "steady")]
    assert record.measured.first_step, "the harness keeps the first step's phases"
    pairs.append((record.measured.first_step, predicted.phases_of(True), "first"))
    for measured, phases, label in pairs:
        for name, m in measured.items():
            if name == Phase.ZERO_GRAD.value:
                continue
            got, pred = m.peak_allocated_bytes, _tensors(phases[name])
            assert abs(pred - got) <= KNOB_TOLERANCE * got, (label, name, pred, got)


# --- what each knob adds, by arithmetic -------------------------------------------------

@pytest.fixture(scope="module")
def gpt2():
    return load_model("gpt2")


def _phase(est, phase: Phase, first: bool = False) -> dict:
    phases = est.first_step_phases if first and est.first_step_phases else est.phases
    return phases[phase]


def test_manual_loop_holds_one_logits_tensor_through_backward(gpt2):
    base = Setup(precision="bf16", batch=4, seq=SEQ)
    trainer, manual = estimate(gpt2, base), estimate(gpt2, Setup(**{**base.to_dict(), "loop": "manual"}))
    logits = base.batch * base.seq * gpt2.vocab_size * 2  # bf16 logits, the model's output
    back = _tensors(manual.phases[Phase.BACKWARD]) - _tensors(trainer.phases[Phase.BACKWARD])
    assert back == logits
    assert manual.phases[Phase.FORWARD] == trainer.phases[Phase.FORWARD]


def test_grad_accum_keeps_gradients_from_the_second_micro_batch(gpt2):
    est = estimate(gpt2, Setup(precision="fp32", seq=SEQ, grad_accum=4))
    grads = est.params * 4
    assert est.phases[Phase.FORWARD][Category.GRADIENTS] == grads
    # step 1 has no optimizer state yet, but micro-batch 2 already finds the gradients
    first = _phase(est, Phase.FORWARD, first=True)
    assert first[Category.GRADIENTS] == grads and first[Category.OPTIMIZER_STATE] == 0
    plain = estimate(gpt2, Setup(precision="fp32", seq=SEQ))
    assert plain.phases[Phase.FORWARD][Category.GRADIENTS] == 0


def test_keep_grads_keeps_them_from_the_second_step(gpt2):
    est = estimate(gpt2, Setup(precision="fp32", seq=SEQ, keep_grads=True))
    assert est.phases[Phase.FORWARD][Category.GRADIENTS] == est.params * 4
    assert _phase(est, Phase.FORWARD, first=True)[Category.GRADIENTS] == 0


def test_fsdp_accumulation_keeps_unsharded_gradients():
    spec = load_model("llama-2-7b")
    kw = dict(precision="bf16", seq=1024, sharding="fsdp", world_size=8)
    plain, accum = estimate(spec, Setup(**kw)), estimate(spec, Setup(**kw, grad_accum=2))
    unsharded = accum.params * 2
    assert accum.phases[Phase.FORWARD][Category.GRADIENTS] == unsharded
    assert plain.phases[Phase.OPTIMIZER][Category.GRADIENTS] < unsharded / 4  # the optimizer steps shards


def test_eval_keeps_every_position_of_the_logits(gpt2):
    setup = Setup(mode="eval", precision="fp32", batch=2, seq=SEQ)
    est = estimate(gpt2, setup)
    assert set(est.phases) == {Phase.FORWARD}
    full_logits = setup.batch * setup.seq * gpt2.vocab_size * 4
    assert est.phases[Phase.FORWARD][Category.LOGITS] >= full_logits
    prefill = estimate(gpt2, Setup(mode="inference", precision="fp32", batch=2, seq=SEQ))
    assert _tensors(est.phases[Phase.FORWARD]) - _tensors(prefill.phases[Phase.PREFILL]) >= full_logits * 0.9


def test_eval_with_cache_adds_the_whole_cache(gpt2):
    kw = dict(mode="eval", precision="bf16", batch=2, seq=SEQ)
    plain, cached = estimate(gpt2, Setup(**kw)), estimate(gpt2, Setup(**kw, use_cache=True))
    grown = _tensors(cached.phases[Phase.FORWARD]) - _tensors(plain.phases[Phase.FORWARD])
    assert grown == kv_cache_bytes(gpt2, Setup(**kw, use_cache=True), SEQ)


def test_a_scoring_forward_without_labels_keeps_the_logits_only(gpt2):
    # --loss none: model(ids) without labels: the (b, s, V) logits in the compute dtype, no fp32
    # copy, no log-softmax (measured against the sim and real CPU steps below)
    setup = Setup(mode="eval", precision="bf16", batch=2, seq=SEQ, loss="none")
    est, scored = estimate(gpt2, setup), estimate(gpt2, setup.replace(loss="causal-lm"))
    logits = setup.batch * setup.seq * gpt2.vocab_size * 2
    assert est.phases[Phase.FORWARD][Category.LOGITS] == logits
    assert scored.phases[Phase.FORWARD][Category.LOGITS] == 5 * logits  # + fp32 copy + fp32 log-softmax
    assert Setup.from_dict(setup.to_dict()) == setup and setup.to_dict()["loss"] == "none"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_loss_none_is_refused_in_training(mode, cli):
    with pytest.raises(ValueError, match="--loss none computes no loss"):
        Setup(mode=mode, loss="none")
    out = cli("estimate", "gpt2", "--mode", mode, "--loss", "none")
    assert out.code == 2 and out.err.count("\n") == 1 and "--mode eval" in out.err, out.err


def test_flags_parse_the_same_everywhere(cli):
    out = cli("estimate", "gpt2", "--loop", "manual", "--grad-accum", "2", "--keep-grads", "--use-cache", "--json")
    assert out.code == 0, out.err
    setup = json.loads(out.out)["setup"]
    assert (setup["loop"], setup["grad_accum"], setup["keep_grads"], setup["use_cache"]) == ("manual", 2, True, True)
    s = Setup.from_dict(setup)
    assert s.loop is Loop.MANUAL and s.grad_accum == 2
    assert Setup(mode="eval").mode is Mode.EVAL and not Setup(mode="eval").training


# --- against measurements ---------------------------------------------------------------

#: one knob per case on real CPU steps, three architectures (every knob on four
#: architectures at seq 512, the table in the issue's note, takes ~15 minutes on 2 cores)
CPU_SEQ = 256
CPU_CASES = [
    ("gpt2", "manual"), ("opt-125m", "grad_accum"), ("smollm2-135m", "keep_grads"),
    ("smollm2-135m", "eval"), ("gpt2", "use_cache"), ("gpt2", "eval_no_loss"),
]


@pytest.mark.parametrize("model,knob", CPU_CASES)
@pytest.mark.slow
def test_each_knob_estimate_equals_real_cpu_steps(model, knob):
    record = run_case(model, Setup(precision="fp32", batch=1, seq=CPU_SEQ, **KNOBS[knob]), "cpu", steps=1)
    _assert_phases_agree(record)


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("model", ["gpt2", "smollm2-135m", "opt-125m"])
@pytest.mark.slow
def test_each_knob_estimate_equals_the_cuda_sim(model, knob):
    record = run_case(model, Setup(precision="bf16", batch=2, seq=SEQ, **KNOBS[knob]), "sim", steps=1)
    _assert_phases_agree(record)


@pytest.mark.slow
def test_validate_compares_first_steps_with_first_steps():
    record = run_case("smollm2-135m", Setup(precision="fp32", seq=128, grad_accum=2), "cpu", steps=1)
    assert record.ok, record.message
    first = max(p.peak_allocated_bytes for ph, p in record.measured.first_step.items() if ph != "zero_grad")
    steady = record.measured.peak_allocated_bytes
    assert first < steady  # step 1 makes the AdamW state only in its optimizer phase
    result = validate([record])
    assert result.summaries["first_step"]["max"] <= KNOB_TOLERANCE
    assert result.summaries["uncalibrated"]["max"] <= KNOB_TOLERANCE


# --- the published benchmarks' knobs: no optimizer step, loss = logits.sum() -------------

def test_optimizer_none_has_no_step_and_no_state(gpt2):
    est = estimate(gpt2, Setup(precision="bf16", seq=SEQ, optimizer="none"))
    assert set(est.phases) == {Phase.FORWARD, Phase.BACKWARD}
    assert all(ph[Category.OPTIMIZER_STATE] == 0 for ph in est.phases.values())
    sgd = estimate(gpt2, Setup(precision="bf16", seq=SEQ, optimizer="sgd"))
    assert est.phases[Phase.BACKWARD] == sgd.phases[Phase.BACKWARD]  # SGD's step adds no state either
    with pytest.raises(ValueError, match="runs no optimizer"):
        Setup(optimizer="none", optimizer_impl="fused")


def test_logits_sum_keeps_only_the_logits(gpt2):
    setup = Setup(precision="bf16", batch=2, seq=SEQ, loss="logits-sum", device="cpu")
    est = estimate(gpt2, setup)
    assert est.phases[Phase.FORWARD][Category.LOGITS] == 2 * setup.batch * setup.seq * gpt2.vocab_size
    causal = estimate(gpt2, setup.replace(loss="causal-lm"))
    # the causal-LM loss adds the fp32 upcast and the fp32 log-softmax: 2 + 4 + 4 bytes per logit
    assert causal.phases[Phase.FORWARD][Category.LOGITS] == 5 * est.phases[Phase.FORWARD][Category.LOGITS]
    assert "loss" not in Setup().to_dict() and Setup.from_dict(setup.to_dict()) == setup
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        Setup(loss="mse")


def test_published_knob_flags_parse(cli):
    out = cli("estimate", "gpt2", "--optimizer", "none", "--loss", "logits-sum", "--json")
    assert out.code == 0, out.err
    setup = json.loads(out.out)["setup"]
    assert (setup["optimizer"], setup["loss"]) == ("none", "logits-sum")
    bad = cli("estimate", "gpt2", "--loss", "nll")
    assert bad.code == 2 and "unknown loss" in bad.err


#: each knob alone and both together, on two architectures, half and fp32, seq 256-512:
#: measured within 0.3 % per phase (torch 2.13, transformers 5.24)
PUBLISHED_KNOB_CASES = [
    ("gpt2", dict(precision="bf16", batch=4, seq=512, optimizer="none", loss="logits-sum", loop="manual")),
    ("opt-125m", dict(precision="fp32", seq=256, optimizer="none")),
    ("gpt2", dict(precision="fp32", seq=256, loss="logits-sum")),
    # the loop that rebinds `out` at the next step: outputs (logits, the cache) live into the next forward
    ("opt-125m", dict(precision="fp32", seq=256, optimizer="sgd", loop="held", use_cache=True)),
]


@pytest.mark.parametrize("model,kw", PUBLISHED_KNOB_CASES, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{v}" for v in x.values()))
@pytest.mark.slow
def test_published_knobs_estimate_equals_real_cpu_steps(model, kw):
    record = run_case(model, Setup(**kw), "cpu", steps=1)
    _assert_phases_agree(record)
    if kw.get("optimizer") == "none":
        assert Phase.OPTIMIZER.value not in record.measured.phases
