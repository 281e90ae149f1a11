"""Exact identities of estimate(): model states per precision recipe and optimizer (ZeRO
paper Sec. 3, PyTorch optimizers keep state in the parameter's dtype), LoRA adapters,
quantized weights, the KV cache (transformers' DynamicCache), ZeRO sharding, the JSON record and the
error messages for bad input."""
from __future__ import annotations

import json

import pytest

from estimator.categories import Category, Phase
from estimator.estimate import Estimate, estimate, model_states
from estimator.fit import fit
from estimator.modelspec import load_model, spec_from_config
from estimator.params import lora_params
from estimator.setup import Setup
from estimator.units import GiB

#: llama-2-7b parameters (meta-llama/Llama-2-7b-hf safetensors metadata)
N = 6_738_415_616

#: 8-bit AdamW keeps 2 bytes/param plus one fp32 absmax per 256 values (= 2.03125);
#: 32-bit state for tensors under 4096 elements (the norms) adds a little more.
ADAMW_8BIT_BYTES_PER_PARAM_MAX = 2.04


@pytest.fixture(scope="module")
def llama7b():
    return load_model("llama-2-7b")


def _states(est: Estimate, phase: Phase = Phase.OPTIMIZER):
    c = est.phases[phase]
    return c[Category.WEIGHTS], c[Category.GRADIENTS], c[Category.OPTIMIZER_STATE]


# --- model states per precision recipe (full training, AdamW) ----------------------------

RECIPES = [
    ("fp32", 4, 4, 8),  # everything fp32: 16 bytes/param
    ("bf16", 2, 2, 4),  # pure bf16: torch.optim state in the parameter dtype
    ("fp16", 2, 2, 4),
    ("amp-bf16", 4, 4, 8),  # fp32 parameters under autocast
    ("amp-fp16", 4, 4, 8),
    ("mixed-bf16", 2, 2, 12),  # ZeRO: bf16 weights/grads + fp32 master, m, v
]


@pytest.mark.parametrize("precision,weights,grads,states", RECIPES)
def test_model_states_per_recipe(llama7b, precision, weights, grads, states):
    ms = model_states(llama7b, Setup(precision=precision, optimizer="adamw"))
    assert (ms.weights, ms.gradients, ms.optimizer_state) == (weights * N, grads * N, states * N)
    assert ms.trainable == N


@pytest.mark.parametrize("precision,weights,grads,states", RECIPES)
def test_full_adamw_optimizer_phase(llama7b, precision, weights, grads, states):
    est = estimate(llama7b, Setup(precision=precision, optimizer="adamw"))
    assert est.params == N
    assert est.trainable_params == N
    if precision == "mixed-bf16":
        # estimate.py: during the master step the fp32 copy of every gradient (4N) sits
        # beside the bf16 .grad (2N)
        grads += 4
    assert _states(est) == (weights * N, grads * N, states * N)


def test_zero_paper_16_bytes_per_param(llama7b):
    ms = model_states(llama7b, Setup(precision="mixed-bf16"))
    assert ms.weights + ms.gradients + ms.optimizer_state == 16 * N


@pytest.mark.parametrize("precision,param_bytes", [("fp32", 4), ("bf16", 2), ("amp-bf16", 4)])
def test_sgd_state(llama7b, precision, param_bytes):
    sgd = estimate(llama7b, Setup(precision=precision, optimizer="sgd"))
    assert _states(sgd)[2] == 0
    momentum = estimate(llama7b, Setup(precision=precision, optimizer="sgd-momentum"))
    assert _states(momentum)[2] == param_bytes * N


def test_adamw_8bit_state(llama7b):
    o = _states(estimate(llama7b, Setup(precision="bf16", optimizer="adamw-8bit")))[2]
    assert 2 * N < o <= ADAMW_8BIT_BYTES_PER_PARAM_MAX * N


def test_optimizer_phase_is_the_peak_of_full_fp32_adamw(llama7b):
    assert estimate(llama7b, Setup(precision="fp32")).peak_phase is Phase.OPTIMIZER


def test_optimizer_impl_temporaries(llama7b):
    """foreach: one state-sized list (``_foreach_sqrt``); fused: none; for-loop: two of the largest tensor."""
    temps = {impl: estimate(llama7b, Setup(precision="fp32", optimizer_impl=impl))
             .phases[Phase.OPTIMIZER][Category.TEMPORARIES] for impl in ("foreach", "fused", "for-loop")}
    workspace = temps["fused"]
    assert temps["foreach"] - workspace == 4 * N
    assert temps["for-loop"] - workspace == 2 * 4 * 32000 * 4096  # largest: embed_tokens / lm_head
    auto_cuda = estimate(llama7b, Setup(precision="fp32")).phases[Phase.OPTIMIZER][Category.TEMPORARIES]
    assert auto_cuda == temps["foreach"]


# --- LoRA and QLoRA --------------------------------------------------------------------

def test_lora_trainable_and_fp32_adapters(llama7b):
    est = estimate(llama7b, Setup(mode="lora", precision="bf16", lora_rank=16, lora_targets=("q_proj", "v_proj")))
    trainable = lora_params(llama7b, ("q_proj", "v_proj"), 16)
    assert trainable == 8_388_608
    assert est.trainable_params == trainable
    w, g, o = _states(est)
    assert w == 2 * N + 4 * trainable  # bf16 base + fp32 adapters (peft autocast_adapter_dtype)
    assert g == 4 * trainable
    assert o == 8 * trainable  # fp32 exp_avg + exp_avg_sq


def test_lora_all_linear_has_more_trainable(llama7b):
    qv = estimate(llama7b, Setup(mode="lora")).trainable_params
    every = estimate(llama7b, Setup(mode="lora", lora_targets="all-linear")).trainable_params
    assert every == lora_params(llama7b, ("all-linear",), 16) > qv


def test_qlora_weights_shrink_with_bits(llama7b):
    lora = _states(estimate(llama7b, Setup(mode="lora", precision="bf16")))[0]
    int8 = _states(estimate(llama7b, Setup(mode="qlora", quant="int8")))[0]
    nf4 = _states(estimate(llama7b, Setup(mode="qlora", quant="nf4")))[0]
    nf4_dq = _states(estimate(llama7b, Setup(mode="qlora", quant="nf4-dq")))[0]
    assert nf4_dq < nf4 < int8 < lora


def test_inference_weights_per_precision(llama7b):
    def weights(**kw):
        return estimate(llama7b, Setup(mode="inference", **kw)).components[Category.WEIGHTS]
    assert weights(precision="fp32") == 4 * N
    assert weights(precision="bf16") == 2 * N
    assert weights(quant="nf4") < weights(quant="int8") < 2 * N


def test_inference_has_no_training_states(llama7b):
    est = estimate(llama7b, Setup(mode="inference"))
    assert est.trainable_params == 0
    for comp in est.phases.values():
        assert comp[Category.GRADIENTS] == comp[Category.OPTIMIZER_STATE] == 0


# --- KV cache ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.1-8b"])  # MHA and GQA (8 kv heads)
def test_kv_cache(name):
    spec = load_model(name)
    batch, seq, new = 4, 1000, 24
    L, kvh, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    est = estimate(spec, Setup(mode="inference", precision="bf16", batch=batch, seq=seq, new_tokens=new))
    # prefill: 2 (K, V) * L * kv_heads * head_dim * batch * seq * 2 bytes
    assert est.phases[Phase.PREFILL][Category.KV_CACHE] == 2 * L * kvh * d * batch * seq * 2
    full = 2 * L * kvh * d * batch * (seq + new) * 2
    # decode: DynamicCache.update concatenates a layer's keys, then its values, so the old and
    # new keys (or values) of one layer coexist: the full cache plus half a layer of it (the
    # sim measures exactly that: tests/test_long_sequences.py decode cases)
    assert est.phases[Phase.DECODE][Category.KV_CACHE] == full + full // (2 * L)
    assert full % L == 0


def test_no_decode_phase_without_new_tokens(llama7b):
    est = estimate(llama7b, Setup(mode="inference", new_tokens=0))
    assert set(est.phases) == {Phase.PREFILL}


def test_kv_cache_fp32_doubles(llama7b):
    bf16 = estimate(llama7b, Setup(mode="inference", precision="bf16", new_tokens=8))
    fp32 = estimate(llama7b, Setup(mode="inference", precision="fp32", new_tokens=8))
    assert fp32.phases[Phase.DECODE][Category.KV_CACHE] == 2 * bf16.phases[Phase.DECODE][Category.KV_CACHE]


# --- sharding (ZeRO paper Sec. 5) ------------------------------------------------------

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("precision", ["bf16", "fp32", "amp-bf16"])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_sharding_per_rank_states(llama7b, precision, world):
    base = Setup(precision=precision)
    w1, g1, o1 = _states(estimate(llama7b, base))
    z1 = _states(estimate(llama7b, base.replace(world_size=world, sharding="zero1")))
    z2 = _states(estimate(llama7b, base.replace(world_size=world, sharding="zero2")))
    z3 = _states(estimate(llama7b, base.replace(world_size=world, sharding="zero3")))
    fsdp = _states(estimate(llama7b, base.replace(world_size=world, sharding="fsdp")))
    ddp = _states(estimate(llama7b, base.replace(world_size=world, sharding="ddp")))
    assert z1 == (w1, g1, _ceil_div(o1, world))
    assert z2 == (w1, _ceil_div(g1, world), _ceil_div(o1, world))
    assert z3 == (_ceil_div(w1, world), _ceil_div(g1, world), _ceil_div(o1, world))
    if world == 3:  # FSDP2 pads every tensor to ceil(rows/N) rows; 4096 rows do not split in 3
        assert all(f >= z for f, z in zip(fsdp, z3)) and fsdp[0] < 1.001 * z3[0]
    else:
        assert fsdp == z3
    assert ddp == (w1, 2 * g1, o1)  # DDP Reducer's flat gradient buckets


@pytest.mark.parametrize("world", [2, 8])
def test_mixed_bf16_sharded_weights_and_states(llama7b, world):
    base = Setup(precision="mixed-bf16")
    w1, _, o1 = _states(estimate(llama7b, base))
    w3, _, o3 = _states(estimate(llama7b, base.replace(world_size=world, sharding="zero3")))
    assert (w3, o3) == (_ceil_div(w1, world), _ceil_div(o1, world))
    assert o3 == _ceil_div(12 * N, world)  # ZeRO-3: K*Psi/N with K = 12


@pytest.mark.parametrize("sharding", ["zero2", "zero3", "fsdp"])
def test_mixed_bf16_sharded_gradients(llama7b, sharding):
    base = Setup(precision="mixed-bf16")
    g1 = _states(estimate(llama7b, base))[1]
    g8 = _states(estimate(llama7b, base.replace(world_size=8, sharding=sharding)))[1]
    assert g8 == _ceil_div(g1, 8)


def test_zero3_gathers_three_layers_at_a_copy_out(llama7b):
    base = Setup(precision="bf16")
    one = estimate(llama7b, base).phases[Phase.FORWARD][Category.TEMPORARIES]
    z3 = estimate(llama7b, base.replace(world_size=4, sharding="zero3")).phases[Phase.FORWARD][Category.TEMPORARIES]
    layer = 2 * (N - 2 * 32000 * 4096 - 4096) // 32  # one bf16 decoder layer
    root = 2 * (2 * 32000 * 4096 + 4096)  # embeddings, lm_head, final norm: held through the step
    # a layer's copy-out: its all-gather buffer, its parameters and the previous layer's buffer
    assert z3 - one == root + 3 * layer


# --- activations and logits sanity -----------------------------------------------------

def test_grad_ckpt_saves_activations(llama7b):
    plain = estimate(llama7b, Setup(batch=8, seq=2048))
    ckpt = estimate(llama7b, Setup(batch=8, seq=2048, grad_ckpt=True))
    assert ckpt.phases[Phase.FORWARD][Category.ACTIVATIONS] < plain.phases[Phase.FORWARD][Category.ACTIVATIONS]


def test_checkpointed_layer_inputs(llama7b):
    """Each checkpointed layer keeps its bf16 input (2 bytes * h per token) plus one rebuilt layer."""
    from estimator.activations import checkpointed_activations, training_activations
    setup = Setup(batch=2, seq=128, grad_ckpt=True)
    ck = checkpointed_activations(llama7b, setup)
    assert ck.per_layer == {"layer_input": 2 * 4096 * 2 * 128}
    assert ck.outside["recomputed_layer"] == training_activations(llama7b, setup).layer_bytes


def test_logits_fp32_upcast(llama7b):
    T, V = 2 * 256, 32000
    est = estimate(llama7b, Setup(precision="bf16", batch=2, seq=256))
    # half logits + fp32 upcast + fp32 log-softmax at the end of forward
    assert est.phases[Phase.FORWARD][Category.LOGITS] == (2 + 4 + 4) * T * V


def test_flash_attention_saves_less_than_eager(llama7b):
    def acts(attn):
        return estimate(llama7b, Setup(attn=attn, seq=2048)).phases[Phase.FORWARD][Category.ACTIVATIONS]
    assert acts("flash") <= acts("sdpa") < acts("eager")


def test_cpu_has_no_context_or_allocator(llama7b):
    est = estimate(llama7b, Setup(device="cpu"))
    assert est.components[Category.CONTEXT] == 0
    assert est.components[Category.ALLOCATOR] == 0


# --- the JSON record --------------------------------------------------------------------

def test_to_dict(llama7b):
    est = estimate(llama7b, Setup(precision="bf16", batch=2, seq=1024))
    d = json.loads(json.dumps(est.to_dict()))
    assert d["model"] == "llama-2-7b"
    assert isinstance(d["total_bytes"], int)
    assert d["total_bytes"] == sum(d["components"].values()) == est.total_bytes
    assert set(d["components"]) == {c.value for c in Category}
    assert all(isinstance(v, int) and v >= 0 for v in d["components"].values())
    assert d["peak_phase"] in {p.value for p in Phase}
    assert d["components"] == d["phases"][d["peak_phase"]]
    assert d["total_bytes"] == max(sum(c.values()) for c in d["phases"].values())
    assert d["params"] == N
    assert d["trainable_params"] == N
    assert sum(d["param_groups"].values()) == N
    assert d["allocated_bytes"] <= d["reserved_bytes"] <= d["total_bytes"]
    assert Setup.from_dict(d["setup"]) == est.setup


# --- fit boundaries ---------------------------------------------------------------------

def test_fit_max_batch_is_the_boundary(llama7b):
    setup = Setup(mode="lora", precision="bf16", seq=1024)
    budget = 24 * GiB
    result = fit(llama7b, setup, budget)
    assert result.max_batch >= 1
    assert estimate(llama7b, setup.replace(batch=result.max_batch)).total_bytes <= budget
    assert estimate(llama7b, setup.replace(batch=result.max_batch + 1)).total_bytes > budget
    assert estimate(llama7b, setup.replace(seq=result.max_seq)).total_bytes <= budget


def test_fit_full_7b_does_not_fit_24gib(llama7b):
    result = fit(llama7b, Setup(precision="mixed-bf16"), 24 * GiB)
    assert not result.fits and result.max_batch == 0
    assert result.max_seq == 0
    assert any(s.fits for s in result.strategies)


# Under ZeRO/FSDP each rank steps only its shard: the foreach temporaries and the
# fp32 gradient copy of mixed-bf16 are shard-sized.


@pytest.mark.parametrize("sharding", ["zero1", "zero2", "zero3", "fsdp"])
def test_sharded_optimizer_temporaries_per_rank(llama7b, sharding):
    base = Setup(precision="mixed-bf16", optimizer_impl="foreach")
    fused = Setup(precision="mixed-bf16", optimizer_impl="fused")
    workspace = estimate(llama7b, fused).phases[Phase.OPTIMIZER][Category.TEMPORARIES]
    one = estimate(llama7b, base).phases[Phase.OPTIMIZER][Category.TEMPORARIES] - workspace
    assert one == 4 * N
    world = 8
    ranked = estimate(llama7b, base.replace(world_size=world, sharding=sharding))
    assert ranked.phases[Phase.OPTIMIZER][Category.TEMPORARIES] - workspace == _ceil_div(one, world)


def test_fit_full_7b_min_gpus_zero3(llama7b):
    result = fit(llama7b, Setup(precision="mixed-bf16"), 24 * GiB)
    assert result.min_gpus is not None and 2 <= result.min_gpus <= 16


# --- bad input ---------------------------------------------------------------------------

def test_batch_zero():
    with pytest.raises(ValueError, match="batch must be a positive integer, got 0"):
        Setup(batch=0)


def test_seq_beyond_max_positions(llama7b):
    with pytest.raises(ValueError, match="seq 4097 is beyond llama-2-7b's 4096 positions"):
        estimate(llama7b, Setup(seq=4097))
    with pytest.raises(ValueError, match="seq 4100 is beyond"):
        estimate(llama7b, Setup(mode="inference", seq=4000, new_tokens=100))


def test_lora_rank_zero():
    with pytest.raises(ValueError, match="lora rank must be a positive integer, got 0"):
        Setup(mode="lora", lora_rank=0)


def test_qlora_without_quant():
    with pytest.raises(ValueError, match="qlora needs a weight quantization"):
        Setup(mode="qlora")


def test_unknown_model_suggests():
    with pytest.raises(ValueError, match=r"unknown model 'llama-2-7'.*did you mean .*llama-2-7b"):
        load_model("llama-2-7")


def test_missing_config_field():
    config = {"model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 100}
    with pytest.raises(ValueError, match="config is missing the field 'hidden_size'"):
        spec_from_config(config)


def test_unknown_lora_target(llama7b):
    with pytest.raises(ValueError, match=r"LoRA target 'c_attn' is not a module of llama-2-7b.*q_proj"):
        estimate(llama7b, Setup(mode="lora", lora_targets=("c_attn",)))
