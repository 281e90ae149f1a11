"""Two ranks for real under torchrun (CPU, gloo): DDP, FSDP2 and FSDP1, one record per rank."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import estimator.estimate
from estimator.setup import Setup
from profiler.measure.distributed import run_distributed, run_sim_rank0
from profiler.record import read_records

#: per rank and phase, the estimator's prediction vs the tracked peak (measured within 1.8%)
PER_RANK_TOLERANCE = 0.03
#: estimate() takes its per-rank terms from estimator/sharding.py once it calls per_rank_states
WIRED = hasattr(estimator.estimate, "per_rank_states")
# as tests/test_profiler.py: hidden 64, 2 layers, vocab 512
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
NPROC = 2
PHASES = ("forward", "backward", "optimizer")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny-llama.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Each sharding measured once (about 15 s each on 2 cores), shared by the tests below."""
    out = tmp_path_factory.mktemp("records") / "dist.jsonl"
    done = {}

    def get(sharding: str):
        if sharding not in done:
            setup = Setup(precision="fp32", seq=32, sharding=sharding)
            done[sharding] = run_distributed(tiny, setup, "cpu", steps=1, nproc=NPROC, out=out, timeout_s=120)
        return done[sharding], out
    return get


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "fsdp1", "fsdp1-shard-grad-op"])
@pytest.mark.slow
def test_two_ranks_give_two_ok_records(runs, sharding):
    records, out = runs(sharding)
    assert [r.rank for r in records] == list(range(NPROC))
    for r in records:
        assert r.status == "ok", r.message
        assert r.world_size == NPROC and r.case.nproc == NPROC
        assert r.case.setup["sharding"] == sharding and r.case.setup["world_size"] == NPROC
        assert set(PHASES) <= set(r.measured.phases)
    assert len({r.case_key for r in records}) == 1
    written = [r for r in read_records(out) if r.case.setup["sharding"] == sharding]
    assert [r.rank for r in written] == list(range(NPROC))


@pytest.mark.slow
def test_ddp_keeps_gradient_buckets_through_the_forward(runs):
    records, _ = runs("ddp")
    grads = records[0].predicted.params * 4  # fp32 gradients
    for r in records:
        bucket_bytes = r.measured.phases["forward"].categories["gradients"]
        assert abs(bucket_bytes - grads) <= 0.01 * grads  # the Reducer's buckets, no .grad yet


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp1"])
@pytest.mark.slow
def test_fsdp_ranks_hold_half_the_weights(runs, sharding):
    records, _ = runs(sharding)
    full = records[0].predicted.params * 4
    for r in records:
        shard = r.measured.phases["optimizer"].categories["weights"]
        assert abs(shard - full / NPROC) <= 0.01 * full / NPROC


@pytest.mark.xfail(not WIRED, reason="estimate() does not yet take its per-rank terms from estimator/sharding.py")
@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "fsdp1", "fsdp1-shard-grad-op"])
@pytest.mark.slow
def test_per_rank_peaks_match_the_estimator(runs, sharding):
    records, _ = runs(sharding)
    for r in records:
        predicted = r.predicted.phases
        for phase in PHASES:
            pred = sum(v for k, v in predicted[phase].items() if k not in ("allocator", "context"))
            got = r.measured.phases[phase].peak_allocated_bytes
            assert abs(pred - got) <= PER_RANK_TOLERANCE * got, (r.rank, phase, pred, got)


#: a QLoRA rank's weights at its optimizer step: the packed 4-bit shard plus bitsandbytes' whole
#: quantization state, measured within 0.1 % on SmolLM2-135M (results/distributed/cpu-fsdp.jsonl)
QLORA_WEIGHTS_TOLERANCE = 0.01


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp1"])
@pytest.mark.slow
def test_qlora_runs_on_fsdp_ranks_with_the_quant_state_on_each(tiny, tmp_path, sharding):
    """Two regressions: transformers 5.24 wrote the temporary checkpoint on rank 0 only (rank 1
    failed), and under FSDP2 the tracker lost the quant state with the weight's DTensor swap."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'vramlab[quant]')")
    setup = Setup(precision="bf16", seq=64, sharding=sharding, mode="qlora", quant="nf4-dq")
    records = run_distributed(tiny, setup, "cpu", steps=1, nproc=NPROC, out=tmp_path / "q.jsonl", timeout_s=300)
    assert [r.status for r in records] == ["ok"] * NPROC, [r.message for r in records]
    for r in records:
        got = r.measured.phases["optimizer"].categories["weights"]
        pred = r.predicted.phases["optimizer"]["weights"]
        assert abs(pred - got) <= QLORA_WEIGHTS_TOLERANCE * got, (r.rank, pred, got)


#: an FSDP1 LoRA rank's gradients at its optimizer step against the estimate's (the whole layer
#: flat parameters' shards under layer units, the adapters' under peft's): measured to the byte
FSDP1_GRADIENTS_TOLERANCE = 0.01


@pytest.mark.slow
def test_fsdp1_layer_units_keep_gradients_for_the_frozen_weights(tiny, tmp_path):
    """--fsdp-wrap layers: the harness wraps decoder layers only, so a layer's flat parameter mixes
    its frozen weights with the adapters and FSDP1 (use_orig_params) keeps a gradient shard for the
    whole of it; under peft's units the adapters' alone. Both as the estimate says, on each rank."""
    from estimator.estimate import estimate
    from estimator.modelspec import load_model
    grads = {}
    for wrap in ("peft", "layers"):
        setup = Setup(precision="fp32", seq=64, sharding="fsdp1", mode="lora", fsdp_wrap=wrap)
        records = run_distributed(tiny, setup, "cpu", steps=2, nproc=NPROC, out=tmp_path / f"{wrap}.jsonl",
                                  timeout_s=300)
        assert [r.status for r in records] == ["ok"] * NPROC, [r.message for r in records]
        est = estimate(load_model(tiny), Setup.from_dict(records[0].case.setup))
        for r in records:
            got = r.measured.phases["optimizer"].categories["gradients"]
            pred = est.phases["optimizer"]["gradients"]
            assert abs(pred - got) <= FSDP1_GRADIENTS_TOLERANCE * got, (wrap, r.rank, pred, got)
        grads[wrap] = est.phases["optimizer"]["gradients"]
    assert grads["layers"] > 10 * grads["peft"]


@pytest.mark.parametrize("kw, match", [
    (dict(precision="bf16"), "uniform dtype"),
    (dict(precision="fp32", sharding="fsdp"), "needs --mode lora and --sharding fsdp1"),
    (dict(precision="fp32", mode="full"), "needs --mode lora and --sharding fsdp1"),
])
def test_layer_units_outside_fsdp1_lora_in_one_dtype_are_refused(cli, kw, match):
    """What FSDP1 itself refuses (mixed dtypes in a flat parameter) or what the knob does not
    describe (FSDP2 keeps every parameter apart; full training has no frozen weights)."""
    kw = {"mode": "lora", "sharding": "fsdp1", **kw}
    with pytest.raises(ValueError, match=match):
        Setup(world_size=2, fsdp_wrap="layers", **kw)
    r = cli("estimate", "smollm2-135m", "--world-size", "2", "--fsdp-wrap", "layers",
            *[x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", v)])
    assert r.code == 2 and match in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_crashed_rank_gives_error_records_not_a_hang(tiny):
    setup = Setup(precision="fp32", seq=32, sharding="fsdp")
    records = run_distributed(tiny, setup, "cpu", steps=1, nproc=NPROC, timeout_s=60, _crash_rank=1)
    assert [r.status for r in records] == ["error"] * NPROC
    assert "exit code 3" in records[1].message
    assert "first failure: rank 1" in records[0].message


@pytest.mark.parametrize("kw,match", [
    (dict(sharding="zero1"), "cannot be measured here"),
    (dict(sharding="none"), "needs a sharding"),
    (dict(sharding="ddp", nproc=0), "nproc must be a positive integer"),
])
def test_setups_that_cannot_run_distributed_are_clear_errors(tiny, kw, match):
    nproc = kw.pop("nproc", NPROC)
    with pytest.raises(ValueError, match=match):
        run_distributed(tiny, Setup(precision="fp32", seq=32, **kw), "cpu", nproc=nproc)


def test_sim_is_not_a_launch_backend(tiny):
    with pytest.raises(ValueError, match="run_sim_rank0"):
        run_distributed(tiny, Setup(precision="fp32", sharding="fsdp"), "sim", nproc=NPROC)


# --- sim: rank 0 of many, FSDP2 over a fake process group on fake tensors --------------
#: 70B cases, about 25-35 s each on 2 cores; eager attention where checkpointing is off,
#: because under FakeTensorMode sdpa saves ~48 MB/layer more than on a real CPU (the
#: single-device sim shows it too), which is the activation model's business, not sharding's
SIM_CASES = [
    (8, dict(precision="bf16", seq=1024, attn="eager")),
    (16, dict(precision="bf16", seq=2048, grad_ckpt=True)),
    (64, dict(precision="bf16", seq=1024, attn="eager", grad_ckpt=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,kw", SIM_CASES, ids=[f"{n}-ranks" for n, _ in SIM_CASES])
def test_sim_rank0_of_many_matches_the_estimator(nproc, kw):
    record = run_sim_rank0("llama-2-70b", Setup(sharding="fsdp", **kw), nproc, steps=1)
    assert record.status == "ok", record.message
    assert record.rank == 0 and record.world_size == nproc and record.case.nproc == nproc
    assert record.backend == "sim"
    if not WIRED:
        pytest.xfail("estimate() does not yet take its per-rank terms from estimator/sharding.py")
    predicted = record.predicted.phases
    for phase in PHASES:
        pred = sum(v for k, v in predicted[phase].items() if k not in ("allocator", "context"))
        got = record.measured.phases[phase].peak_allocated_bytes
        assert abs(pred - got) <= PER_RANK_TOLERANCE * got, (nproc, phase, pred, got)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp1", "fsdp1-shard-grad-op"])
def test_sim_does_not_run_ddp_or_fsdp1(sharding):
    with pytest.raises(ValueError, match="sim runs FSDP2"):
        run_sim_rank0("llama-2-70b", Setup(sharding=sharding), 8)


#: FSDP1 (and FSDP2) per rank and phase, committed torchrun records vs the estimate recomputed now. The
#: estimate is rank 0's: another rank's optimizer step holds its own largest piece of a
#: parameter (measured: rank 1 +0.55 % gpt2, +1.10 % opt-125m in the optimizer phase);
#: every rank's step peak within 0.25 % (measured: 0.20 % gpt2 FSDP2, FSDP1 within 0.05 %).
FSDP1_RECORDS = Path(__file__).resolve().parents[1] / "results" / "distributed" / "cpu-fsdp.jsonl"
FSDP1_PHASE_TOLERANCE = 0.015
FSDP1_PEAK_TOLERANCE = 0.0025


@pytest.mark.parametrize("record", read_records(FSDP1_RECORDS), ids=lambda r: f"{r.label}-rank{r.rank}")
def test_committed_fsdp_ranks_agree_with_the_estimate(record):
    """FSDP1 and the FSDP2 comparison cases (GPT-2's tied embedding at the end of backward:
    +5.02 % before the tied sum was modelled, -0.20 % after)."""
    from estimator.estimate import estimate
    from estimator.modelspec import load_model
    assert record.ok, record.message
    setup = Setup.from_dict(record.case.setup)
    est = estimate(load_model(record.case.model), setup)
    # layer units: the estimate's optimizer state is the busiest rank's (its adapter pieces,
    # sharding._fsdp1_layer_unit_states); a rank holding fewer sits above by the difference
    # (measured: SmolLM2-135M q,v on 2 ranks, rank 0 holds every adapter, rank 1 none)
    spare = max(0, est.phases["optimizer"]["optimizer_state"]
                - record.measured.phases["optimizer"].categories["optimizer_state"]) if setup.layer_units else 0
    for phase, measured in record.measured.phases.items():
        if phase not in PHASES:
            continue
        pred = sum(v for k, v in est.phases[phase].items() if str(k) not in ("allocator", "context"))
        got = measured.peak_allocated_bytes
        assert -FSDP1_PHASE_TOLERANCE * got <= pred - got <= FSDP1_PHASE_TOLERANCE * got + spare, (phase, pred, got)
    got = record.measured.peak_allocated_bytes  # the step's peak: backward on every rank here
    assert -FSDP1_PEAK_TOLERANCE * got <= est.allocated_bytes - got <= FSDP1_PEAK_TOLERANCE * got + spare, \
        (est.allocated_bytes, got)
