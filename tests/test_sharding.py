"""Per-rank states (estimator/sharding.py): ZeRO Table 1, DDP buckets, FSDP2 and FSDP1 gathering."""
from __future__ import annotations

import subprocess
import sys

import pytest

from estimator.estimate import estimate, model_states
from estimator.modelspec import load_model, spec_from_config
from estimator.params import count_params, layer_linears
from estimator.setup import Setup
from estimator.sharding import (
    DDP_FIRST_BUCKET_BYTES,
    MAX_WORLD_SIZE,
    _flat_numel,
    _rank0_pieces,
    ddp_bucket_sizes,
    per_rank_states,
    smallest_world,
)

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
              "max_position_embeddings": 256, "tie_word_embeddings": False}
SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp1", "fsdp1-shard-grad-op")


@pytest.fixture(scope="module")
def llama7b():
    return load_model("llama-2-7b")


def _ranked(spec, world, sharding, **kw):
    setup = Setup(world_size=world, sharding=sharding, **kw)
    return per_rank_states(spec, setup, model_states(spec, setup))


@pytest.mark.parametrize("world", [1, 2, 4, 8, 64, 256, 1024])
def test_zero_table1_identities_mixed_precision(llama7b, world):
    # Rajbhandari et al. 2019, Table 1, mixed-precision Adam (K = 12): Ψ = 6,738,415,616
    # parameters, a multiple of 1024, so every term divides exactly
    psi = count_params(llama7b).total
    assert psi % MAX_WORLD_SIZE == 0
    kw = dict(precision="mixed-bf16", optimizer="adamw")
    assert _ranked(llama7b, world, "zero1", **kw).model_states == 4 * psi + 12 * psi // world
    assert _ranked(llama7b, world, "zero2", **kw).model_states == 2 * psi + 14 * psi // world
    assert _ranked(llama7b, world, "zero3", **kw).model_states == 16 * psi // world
    fsdp = _ranked(llama7b, world, "fsdp", **kw).model_states
    if world <= 256:  # every dim 0 (32000, 11008, 4096) splits evenly
        assert fsdp == 16 * psi // world
    else:  # FSDP2 pads each tensor to ceil(rows/N) rows: 32000 rows -> 32 per rank at 1024
        assert 16 * psi // world < fsdp < 1.02 * 16 * psi // world


@pytest.mark.parametrize("world", [3, 7, 1000])
def test_zero_terms_round_up_per_term(world):
    spec = spec_from_config(TINY_LLAMA, "tiny")
    psi = count_params(spec).total  # 158,016: not a multiple of 3, 7 or 1000
    kw = dict(precision="mixed-bf16")
    up = lambda x: -(-x // world)  # noqa: E731
    assert _ranked(spec, world, "zero1", **kw).model_states == 4 * psi + up(12 * psi)
    assert _ranked(spec, world, "zero2", **kw).model_states == 2 * psi + up(2 * psi) + up(12 * psi)
    assert _ranked(spec, world, "zero3", **kw).model_states == up(2 * psi) + up(2 * psi) + up(12 * psi)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_per_rank_memory_never_grows_with_world_size(llama7b, sharding):
    setup = Setup(precision="bf16", seq=1024, grad_ckpt=True)
    states = model_states(llama7b, setup)
    last_states = last_total = None
    for world in range(1, MAX_WORLD_SIZE + 1):
        ranked = setup.replace(world_size=world, sharding=sharding)
        here = per_rank_states(llama7b, ranked, states).model_states
        if last_states is not None:
            assert here <= last_states, (sharding, world)
        last_states = here
        # FSDP2's all-gather buffers are N * ceil(rows/N) rows: one more rank than a divisor
        # of the rows can grow them (64 -> 65 ranks: 4096 -> 4160 rows), so for fsdp the
        # whole step is monotone over powers of two, the resident shards over every N;
        # FSDP1's unsharded flat parameters are padded to a multiple of N (up to N-1 more
        # elements per unit) likewise
        # (the tensors: NCCL's buffers come with the second rank and the allocator's cache is
        # not monotone, tests/test_properties.py _assert_grows)
        if not sharding.startswith("fsdp") or world & (world - 1) == 0:
            total = estimate(llama7b, ranked).allocated_bytes
            if last_total is not None:
                assert total <= last_total, (sharding, world)
            last_total = total


def test_ddp_buckets_duplicate_gradients_unless_bucket_view(llama7b):
    setup = Setup(precision="bf16", world_size=8, sharding="ddp")
    states = model_states(llama7b, setup)
    copy = per_rank_states(llama7b, setup, states)
    assert copy.buckets == copy.gradients == states.gradients  # .grad and the bucket: twice
    assert (copy.weights, copy.optimizer_state) == (states.weights, states.optimizer_state)
    view = per_rank_states(llama7b, setup, states, gradient_as_bucket_view=True)
    assert view.buckets == states.gradients and view.gradients == 0  # .grad is a view of it
    # the buckets live from DDP's constructor on: in the forward too
    assert copy.forward_extra()["gradients"] == states.gradients


def test_ddp_buckets_hold_only_trainable_gradients_under_lora(llama7b):
    setup = Setup(mode="lora", precision="bf16", world_size=4, sharding="ddp")
    states = model_states(llama7b, setup)
    ranked = per_rank_states(llama7b, setup, states)
    assert ranked.buckets == 4 * states.trainable  # fp32 adapters only
    assert ranked.weights == states.weights  # the frozen base is replicated


def test_ddp_bucket_sizes_sum_to_the_gradients():
    grads = [2**19] * 7 + [30 * 2**20, 3 * 2**20]
    sizes = ddp_bucket_sizes(grads)
    assert sum(sizes) == sum(grads)
    assert sizes[0] >= DDP_FIRST_BUCKET_BYTES and sizes[0] < DDP_FIRST_BUCKET_BYTES + 30 * 2**20
    assert len(sizes) == 3


def test_fsdp_gathers_layers_in_forward_plus_the_root():
    spec = spec_from_config(TINY_LLAMA, "tiny")
    setup = Setup(precision="bf16", world_size=2, sharding="fsdp")
    states = model_states(spec, setup)
    ranked = per_rank_states(spec, setup, states)
    layer = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64)  # q,o + k,v + mlp + 2 norms, bf16
    root = 2 * (2 * 512 * 64 + 64)  # embeddings, lm_head, final norm
    assert ranked.layer_params == layer and ranked.root_params == root
    assert ranked.root_params + spec.num_layers * ranked.layer_params == states.weights
    assert ranked.layer_grad_shard == layer // 2 and ranked.layer_reduce_input == layer
    assert ranked.forward_extra()["temporaries"] == root + layer  # at the loss: the last layer's buffer
    # the end of the last layer: its all-gather buffer and its parameters -- two layers
    end = ranked.forward_layer(saved=10**9, per_layer=10**9)
    assert end["temporaries"] == root + 2 * layer and end["activations"] == 10**9
    # a copy-out: the previous layer's buffer is still referenced -- three layers
    copy_out = ranked.forward_layer(saved=10**9, per_layer=layer // 2)
    assert copy_out["temporaries"] == root + 3 * layer


def test_fsdp_pads_every_tensor_to_whole_rows_per_rank():
    # FSDP2 chunks dim 0 and pads to ceil(rows/N) rows; at 64 ranks the tiny model's
    # k_proj (32 rows) still costs each rank one full row (measured: sim, tiny-llama, 64 ranks)
    spec = spec_from_config(TINY_LLAMA, "tiny")
    setup = Setup(precision="fp32", world_size=64, sharding="fsdp")
    ranked = per_rank_states(spec, setup, model_states(spec, setup))
    layer = 4 * 64 + 2 * 3 * 64 + 176 + 2  # q,k,v,o: 1 row of 64; gate, up: 3 rows; down: 1 row of 176; norms
    root = 2 * 8 * 64 + 1  # embeddings and lm_head: 8 rows of 64; the final norm: 1 element
    assert ranked.weights == 4 * (root + 2 * layer)
    assert ranked.layer_params == 64 * 4 * layer  # the padded all-gather
    even = per_rank_states(spec, setup.replace(sharding="zero3"), model_states(spec, setup))
    assert even.weights == -(-model_states(spec, setup).weights // 64)  # DeepSpeed: flat partitions


def test_fsdp1_flat_parameters_align_each_tensor_and_pad_to_the_world():
    # use_orig_params: each tensor starts on 16 bytes (4 fp32 elements), the whole padded to N
    assert _flat_numel([3, 5], 4, 2) == 10  # 3, pad 1, 5 -> 9, pad to 10
    assert _flat_numel([3, 5], 4, 3) == 9
    assert _flat_numel([8, 8], 4, 3) == 18
    assert _rank0_pieces([3, 5], 4, 2) == [3, 1]  # rank 0 holds [0, 5): all of the first, 1 of the second
    spec = spec_from_config(TINY_LLAMA, "tiny")
    setup = Setup(precision="fp32", world_size=3, sharding="fsdp1")
    ranked = per_rank_states(spec, setup, model_states(spec, setup))
    # q,k,v,o; gate, up, down; 2 norms: every size a multiple of 4 elements: no alignment padding
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64
    root = 2 * 512 * 64 + 64
    assert ranked.layer_params == 4 * (layer + (-layer) % 3) and ranked.root_params == 4 * (root + (-root) % 3)
    assert ranked.weights == (ranked.root_params + 2 * ranked.layer_params) // 3
    assert ranked.optimizer_state == 2 * ranked.weights and ranked.gradients == ranked.weights


def test_fsdp1_gathers_in_place_and_shard_grad_op_keeps_every_layer():
    spec = spec_from_config(TINY_LLAMA, "tiny")
    setup = Setup(precision="bf16", world_size=2, sharding="fsdp1")
    full = per_rank_states(spec, setup, model_states(spec, setup))
    kept = per_rank_states(spec, setup.replace(sharding="fsdp1-shard-grad-op"), model_states(spec, setup))
    R, P, G = full.root_params, full.layer_params, full.layer_grads
    # at the loss FULL_SHARD holds only the root (the last layer resharded after its forward;
    # FSDP2 also holds that layer's buffer); SHARD_GRAD_OP every layer
    assert full.forward_extra()["temporaries"] == R
    assert kept.forward_extra()["temporaries"] == R + 2 * P
    # no copy-out: the end of the last layer holds that layer once
    assert full.forward_layer(saved=10**9, per_layer=10**7)["temporaries"] == R + P
    # backward: the layer, the prefetched next one and, at the layer's end, its parameters'
    # gradients beside their concatenation
    moment = full.backward_layer(saved=10**9, per_layer=10**7, working_set=0)
    assert moment["temporaries"] in (R + 2 * P, R + 2 * P + 2 * G)
    end = full.backward_end_extra()
    assert end["temporaries"] == R + full.root_grads + full.root_view_grads
    assert end["gradients"] == -full.root_grad_shard  # the root's shard is made after this moment


def test_fsdp1_under_lora_wraps_each_adapter_on_its_own(llama7b):
    setup = Setup(mode="lora", precision="bf16", world_size=8, sharding="fsdp1")
    states = model_states(llama7b, setup)
    ranked = per_rank_states(llama7b, setup, states)
    # q_proj and v_proj adapters: A (16, 4096) and B (4096, 16) per layer, fp32, each padded to 8
    assert ranked.gradients == 32 * 4 * 4 * (16 * 4096) // 8
    assert ranked.root_grads == ranked.head_weight_grad == 0
    assert ranked.largest_view == 16 * 4096 // 8


@pytest.mark.slow
def test_fsdp1_sizes_match_torch_flat_parameters():
    """torch's own FSDP1 on a fake process group of 3 ranks (in a fresh process): rank 0's
    flat parameter per unit is the estimator's shard, the padded total its unsharded size."""
    code = f"""
import json, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from estimator.modelspec import spec_from_config
from estimator.setup import Setup
from profiler.measure.build import build_model
from profiler.measure.distributed import wrap
spec = spec_from_config({TINY_LLAMA!r}, "tiny")
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
out = {{}}
for mode in ("full", "lora"):
    setup = Setup(precision="fp32", world_size=3, sharding="fsdp1", mode=mode)
    model = wrap(build_model(spec, setup, "cpu"), spec, setup, "cpu", 3)
    flats = [m._handle.flat_param for m in model.modules() if getattr(m, "_handle", None) is not None]
    out[mode] = [[f.numel(), int(f._unpadded_unsharded_size.numel()), f.requires_grad] for f in flats]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json
    got = json.loads(done.stdout.strip().splitlines()[-1])
    spec = spec_from_config(TINY_LLAMA, "tiny")
    for mode in ("full", "lora"):
        setup = Setup(precision="fp32", world_size=3, sharding="fsdp1", mode=mode)
        ranked = per_rank_states(spec, setup, model_states(spec, setup))
        flats = got[mode]
        assert sum(shard for shard, _, _ in flats) * 4 == ranked.weights, mode
        assert all(unsharded == 3 * shard for shard, unsharded, _ in flats)
        trainable = sum(shard for shard, _, grad in flats if grad)
        assert trainable * 4 == ranked.gradients, mode
        unsharded = sorted(u for _, u, _ in flats)
        assert unsharded[-1] * 4 == ranked.root_params  # the root unit is the largest here
        if mode == "full":
            assert ranked.layer_params == unsharded[0] * 4


@pytest.mark.parametrize("sharding", ["fsdp", "fsdp1", "zero3"])
def test_qlora_quantization_state_stays_whole_on_every_rank(llama7b, sharding):
    # FSDP shards parameters; bitsandbytes' absmax (an attribute of Params4bit) is none
    from estimator.params import quant_state_bytes
    setup = Setup(mode="qlora", quant="nf4", precision="bf16", world_size=8, sharding=sharding)
    states = model_states(llama7b, setup)
    ranked = per_rank_states(llama7b, setup, states)
    state = quant_state_bytes(llama7b, "nf4", True)
    # per quantized tensor: an fp32 absmax per 64 values and the 16-value fp32 NF4 code
    # (bitsandbytes 0.50.2 functional.py quantize_4bit; estimator/params.py quant_state_bytes)
    per_layer = sum(lin.copies * 4 * (-(-(lin.in_features * lin.out_features) // 64) + 16)
                    for lin in layer_linears(llama7b))
    assert state == llama7b.num_layers * per_layer
    assert ranked.weights == -(-(states.weights - state) // 8) + state


def test_fsdp_under_lora_shards_the_frozen_base(llama7b):
    setup = Setup(mode="lora", precision="bf16", world_size=8, sharding="fsdp")
    states = model_states(llama7b, setup)
    ranked = per_rank_states(llama7b, setup, states)
    assert ranked.weights == -(-states.weights // 8)
    assert ranked.gradients == -(-states.gradients // 8)
    assert ranked.root_grads == ranked.head_grads == 0  # embeddings and head are frozen
    zero1 = per_rank_states(llama7b, setup.replace(sharding="zero1"), states)
    assert zero1.weights == states.weights and zero1.gradients == states.gradients
    assert zero1.optimizer_state == -(-states.optimizer_state // 8)


@pytest.mark.parametrize("sharding,gathers", [("ddp", False), ("zero1", False), ("zero2", False),
                                              ("zero3", True), ("fsdp", True), ("fsdp1", True)])
def test_only_gathering_schemes_peak_inside_a_layer(llama7b, sharding, gathers):
    ranked = _ranked(llama7b, 8, sharding, precision="bf16")
    moment = ranked.backward_layer(saved=10**9, per_layer=10**7, working_set=10**6)
    assert (moment is not None) is gathers
    # middle layers: parameters, the prefetched next layer, the previous reduce-scatter input (FSDP2)
    if gathers and sharding != "fsdp1":
        assert moment["temporaries"] == ranked.root_params + 2 * ranked.layer_params + ranked.layer_reduce_input


def test_world_size_beyond_1024_is_a_clear_error(llama7b):
    setup = Setup(world_size=2048, sharding="fsdp")
    with pytest.raises(ValueError, match="outside 1..1024"):
        per_rank_states(llama7b, setup, model_states(llama7b, setup))


def test_smallest_world_is_the_boundary(llama7b):
    setup = Setup(precision="bf16", seq=1024, grad_ckpt=True)
    budget = 24 * 2**30

    def fits(w):
        ranked = setup if w == 1 else setup.replace(world_size=w, sharding="fsdp")
        return estimate(llama7b, ranked).total_bytes <= budget

    n = smallest_world(llama7b, setup, budget, estimate, sharding="fsdp")
    assert n is not None and n > 1
    assert fits(n) and not any(fits(w) for w in range(1, n))
    pow2 = smallest_world(llama7b, setup, budget, estimate, sharding="fsdp", powers_of_two=True)
    assert pow2 >= n and pow2 & (pow2 - 1) == 0 and fits(pow2) and not fits(pow2 // 2)
    assert smallest_world(llama7b, setup, estimate(llama7b, setup).total_bytes, estimate) == 1  # fits as given
    assert smallest_world(llama7b, setup, 2**20, estimate) is None  # 1 MiB: never
    with pytest.raises(ValueError, match="needs a sharding"):
        smallest_world(llama7b, setup, budget, estimate, sharding="none")


def test_fit_and_rules_use_the_same_search(llama7b):
    from estimator.fit import fit
    from estimator.rules import _per_gpu
    setup = Setup(precision="mixed-bf16", seq=512)
    budget = 80 * 10**9
    result = fit(llama7b, setup, budget)
    assert result.min_gpus == smallest_world(llama7b, setup, budget, estimate, sharding="zero3")
    assert not result.fits and result.min_gpus > 1
    h100 = 85017755648  # estimator/data/gpus.json h100-80gb
    assert _per_gpu(llama7b, setup)[0] == smallest_world(llama7b, setup, h100, estimate, sharding="zero3",
                                                         powers_of_two=True)
    roomy = fit(llama7b, setup.replace(mode="lora"), budget)
    assert roomy.fits and roomy.min_gpus is None  # never "fits as given" and "needs N GPUs" together


def test_sharding_module_imports_no_torch():
    code = "import sys, estimator.sharding; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_sharding_names_users_write_map_to_the_canonical_choice():
    assert Setup(world_size=2, sharding="fsdp2").sharding.value == "fsdp"
    assert Setup(world_size=2, sharding="FSDP1_GRAD_OP").sharding.value == "fsdp1-shard-grad-op"
    assert Setup(world_size=2, sharding="fsdp1-full-shard").sharding.value == "fsdp1"
    with pytest.raises(ValueError, match="fsdp1-shard-grad-op"):
        Setup(world_size=2, sharding="fsdp3")
