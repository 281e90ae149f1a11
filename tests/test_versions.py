"""Version-aware estimates (estimator/versions.py): the switches read from released
transformers wheels, and the estimate under old semantics against steps measured under
those versions (results/versions/, measured in a venv with transformers 4.48.3)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator.archs import traits
from estimator.estimate import estimate
from estimator.modelspec import load_model
from estimator.setup import Setup
from estimator.versions import Semantics, parse_overrides, parse_version
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
OLD_RECORDS = ROOT / "results" / "versions" / "transformers-4.48.3" / "cpu-steps.jsonl"
#: every committed old-version record set (benchmarks/old_versions.py, one folder per transformers)
OLD_RECORD_FILES = sorted((ROOT / "results" / "versions").glob("transformers-*/cpu-*.jsonl"))

#: A real CPU step under old library versions and the estimate under those versions'
#: semantics: the same bound as every other knob (tests/test_workloads.py KNOB_TOLERANCE).
VERSION_TOLERANCE = 0.01


def _sem(**versions) -> Semantics:
    return Semantics(tuple(sorted(versions.items())))


@pytest.mark.parametrize("transformers, torch, shifted, repeats, contiguous", [
    ("4.48.3", "2.4", True, True, True),
    ("4.49.0", "2.4", False, True, True),     # 4.49 pads the labels (PR #35646)
    ("4.53.3", "2.6", False, True, True),
    ("4.54.0", "2.4", False, True, True),     # enable_gqa needs torch >= 2.5
    ("4.54.0", "2.5", False, False, True),    # PR #39412
    ("4.55.0", "2.13", False, False, True),
    ("4.56.0", "2.13", False, False, False),  # q, k, v no longer made contiguous
    ("5.24.0", "2.13", False, False, False),
])
def test_semantics_switch_at_the_releases_read_from_the_wheels(transformers, torch, shifted, repeats, contiguous):
    s = _sem(transformers=transformers, torch=torch)
    assert (s.loss_copies_shifted_logits, s.sdpa_repeats_kv, s.sdpa_inputs_contiguous) == (shifted, repeats, contiguous)


def test_version_overrides_are_checked():
    assert parse_overrides("transformers=4.48, torch=2.4") == {"transformers": "4.48", "torch": "2.4"}
    assert parse_version("2.11.0+cu130") == (2, 11, 0) and parse_version("4.48") == (4, 48, 0)
    with pytest.raises(ValueError, match="unknown library 'foo'"):
        parse_overrides("foo=1")
    with pytest.raises(ValueError, match="NAME=VERSION"):
        parse_overrides("transformers")
    with pytest.raises(ValueError, match="not a version number"):
        parse_overrides("transformers=latest")
    with pytest.raises(ValueError, match="unknown library"):
        Setup(versions={"tensorflow": "2.0"})


def test_the_installed_versions_leave_setups_and_case_keys_as_they_were():
    assert "versions" not in Setup().to_dict()  # records keep their case keys
    pinned = Setup(versions="transformers=4.48")
    assert pinned.to_dict()["versions"] == [["transformers", "4.48"]]
    assert Setup.from_dict(pinned.to_dict()) == pinned


def test_old_semantics_move_the_estimate_where_the_measurements_say():
    # GQA (SmolLM2: 9 heads over 3 kv heads) in bf16 on cpu: all three switches apply
    spec = load_model("smollm2-135m")
    setup = Setup(precision="bf16", batch=2, seq=512, device="cpu")
    new = estimate(spec, setup.replace(versions={"transformers": "5.24"}))
    old = estimate(spec, setup.replace(versions={"transformers": "4.48.3"}))
    assert old.allocated_bytes > new.allocated_bytes


def test_estimate_json_states_the_versions_it_assumed(cli):
    r = cli("estimate", "smollm2-135m", "--versions", "transformers=4.48", "--json")
    assert r.code == 0, r.err
    assumed = json.loads(r.out)["assumed_versions"]
    assert assumed["versions"]["transformers"] == "4.48" and assumed["loss_copies_shifted_logits"] is True
    r = cli("estimate", "smollm2-135m", "--versions", "transformers=new")
    assert r.code == 2 and "not a version number" in r.err


@pytest.mark.parametrize("record", [r for path in OLD_RECORD_FILES for r in read_records(path)],
                         ids=lambda r: f"{r.versions.get('transformers')}-{r.label}")
def test_committed_old_version_steps_agree_with_the_estimate_under_their_versions(record):
    # measured under transformers 4.48.3 (cpu backend, results/versions/.../provenance.txt);
    # the estimate is recomputed here under the versions the record names
    assert record.ok, record.message
    versions = {k: v for k, v in record.versions.items()
                if k in ("torch", "transformers", "peft") and v[:1].isdigit()}  # not "absent"
    setup = Setup.from_dict(record.case.setup).replace(versions=versions)
    predicted = estimate(load_model(record.case.model), setup).allocated_bytes
    measured = record.measured.peak_allocated_bytes
    assert abs(predicted - measured) / measured <= VERSION_TOLERANCE, (predicted, measured)


def test_a_real_step_under_the_installed_old_transformers_agrees():
    import transformers
    if parse_version(transformers.__version__) >= (4, 56):
        pytest.skip(f"needs transformers < 4.56 installed (have {transformers.__version__}); "
                    f"the committed 4.48.3 records are checked above")
    from profiler.measure.run import run_case
    record = run_case("smollm2-135m", Setup(precision="bf16", batch=2, seq=512), "cpu", steps=1)
    assert record.ok, record.message
    measured, predicted = record.measured.peak_allocated_bytes, record.predicted.allocated_bytes
    assert abs(predicted - measured) / measured <= VERSION_TOLERANCE


def test_mixtral_qlora_experts_are_quantized_before_transformers_5_and_not_after():
    # the example: fused 3-D experts stay bf16 under bitsandbytes in transformers >= 5
    spec = load_model("mixtral-8x7b")
    # without peft's preparation the unquantized experts stay bf16 (with it, fp32: KbitPrep)
    setup = Setup(mode="qlora", quant="nf4", precision="bf16", batch=1, seq=512, kbit_prep="none")
    old = estimate(spec, setup.replace(versions={"transformers": "4.48"})).components
    new = estimate(spec, setup.replace(versions={"transformers": "5.0"})).components
    from estimator.categories import Category
    # layers x experts x (w1, w2, w3) x hidden x ffn (Mixtral config), and the router (nn.Linear
    # in 4.x, MixtralTopKRouter in 5.x: 5.24 models/mixtral/modeling_mixtral.py:96)
    tensors = [(4096 * 14336, 32 * 8 * 3), (4096 * 8, 32)]
    experts = sum(n * k for n, k in tensors)
    # bf16 (2 bytes) vs nf4 (0.5 byte + one fp32 absmax per 64-element block: 1/16 byte, and
    # each tensor's 16-value fp32 code: estimator/params.py quant_state_bytes)
    nf4 = experts // 2 + sum(k * (4 * (n // 64) + 64) for n, k in tensors)
    # the inventory holds 4.x's w1 and w3 as one gate_up stack per expert (estimator/archs/mixtral.py),
    # so it counts 256 of those 64-byte codes fewer than 4.x's separate linears have
    codes = 32 * 8 * 64
    assert new[Category.WEIGHTS] - old[Category.WEIGHTS] == experts * 2 - nf4 + codes


@pytest.mark.parametrize("transformers, opt, gpt2", [
    ("4.46.0", True, True), ("4.48.3", True, True), ("4.49.0", False, True), ("4.50.0", False, True),
    ("5.24.0", False, False),
])
def test_training_caches_were_tuples_of_attention_tensors(transformers, opt, gpt2):
    # read in the wheels: OPT's tuple cache through 4.48.3, DynamicCache from 4.49.0;
    # GPT-2's tuples through 4.50.0 (the families' tuple_cache switches, estimator/archs)
    s = _sem(transformers=transformers, torch="2.4")
    assert tuple(traits(load_model(m), s).tuple_cache for m in ("opt-125m", "gpt2", "tinyllama-1.1b")) \
        == (opt, gpt2, False)


def test_a_held_tuple_cache_keeps_gpt2s_whole_qkv_projection():
    spec = load_model("gpt2")
    kw = dict(precision="fp16", batch=2, seq=256, optimizer="none", loss="logits-sum", loop="held", use_cache=True)
    old = estimate(spec, Setup(**kw, versions={"transformers": "4.42"}))
    new_cache_off = estimate(spec, Setup(**{**kw, "use_cache": False}, versions={"transformers": "4.42"}))
    qkv = spec.num_layers * 3 * spec.hidden_size * 2 * 256 * 2  # c_attn outputs, fp16
    # the previous step's outputs, held into this step's forward
    assert old.phases["forward"]["kv_cache"] - new_cache_off.phases["forward"]["kv_cache"] == qkv


def test_old_version_records_cover_the_published_benchmarks_versions():
    # GPT-2's own attention classes and tuple caches (4.42.4, the gpt2 table), OPT's score
    # clamp and tuple caches (4.46.0, the opt table; 4.48.3): measured, not only read
    found = {path.parent.name for path in OLD_RECORD_FILES}
    assert {"transformers-4.42.4", "transformers-4.46.0", "transformers-4.48.3"} <= found
    # and generate's prefill under each (every position's logits where the forward has no
    # logits_to_keep; Qwen2's per-layer rotary tables before 4.45)
    prefill = {path.parent.name for path in OLD_RECORD_FILES if path.name == "cpu-prefill.jsonl"}
    assert {"transformers-4.42.4", "transformers-4.46.0", "transformers-4.48.3"} <= prefill


@pytest.mark.parametrize("model,transformers,full,fp32_copy", [
    ("tinyllama-1.1b", "4.44.2", True, True), ("tinyllama-1.1b", "4.45.0", False, False),
    ("gpt2", "4.52.1", True, False), ("gpt2", "4.53.0", False, False), ("opt-125m", "4.57.0", True, False),
    ("opt-125m", "5.0.0", False, False)])
def test_prefill_logits_switch_where_the_forward_takes_logits_to_keep(model, transformers, full, fp32_copy):
    tr = traits(load_model(model), _sem(transformers=transformers))
    assert (tr.prefill_full_logits, tr.prefill_logits_fp32) == (full, fp32_copy)


def test_full_prefill_logits_move_the_estimate_by_their_bytes():
    spec = load_model("smollm2-135m")
    setup = Setup(mode="inference", precision="bf16", batch=2, seq=512, device="cpu")
    old = estimate(spec, setup.replace(versions="transformers=4.44.2")).total_bytes
    new = estimate(spec, setup.replace(versions="transformers=4.45.0")).total_bytes
    logits = 2 * 512 * spec.vocab_size * (2 + 4)  # bf16 logits and their fp32 copy
    assert abs((old - new) - logits) <= 0.05 * logits  # the hidden state there, the layer's transient before
    qwen2 = load_model("qwen2.5-0.5b")
    assert traits(qwen2, _sem(transformers="4.44.2")).rotary_tables_per_layer
    assert not traits(qwen2, _sem(transformers="4.45.0")).rotary_tables_per_layer


@pytest.mark.parametrize("torch_version,impl", [("1.13.1", "for-loop"), ("2.0.0", "foreach"), ("2.13.0", "foreach")])
def test_torch_default_optimizer_implementation_by_version(torch_version, impl):
    """torch 1.x's AdamW took the for-loop path unless told otherwise; 2.0 made foreach the
    default on CUDA; on CPU the default stays the for-loop. The estimate under a version is
    the estimate with that implementation named."""
    spec = load_model("smollm2-135m")
    auto = Setup(precision="bf16", seq=256, versions=f"torch={torch_version}")
    assert auto.resolved_optimizer_impl.value == impl
    assert estimate(spec, auto).phases == estimate(spec, auto.replace(optimizer_impl=impl)).phases
    assert Setup(device="cpu", versions=f"torch={torch_version}").resolved_optimizer_impl.value == "for-loop"
    # the foreach step's _foreach_sqrt list is one optimizer-state-sized temporary (fp32 per
    # parameter here), the for-loop's two of the largest parameter: more than 1 % of the peak
    old = estimate(spec, auto.replace(versions="torch=1.13.1")).total_bytes
    new = estimate(spec, auto.replace(versions="torch=2.0.0")).total_bytes
    assert new - old > 0.01 * new
