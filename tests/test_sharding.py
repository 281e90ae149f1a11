"""Per-rank states (estimator/sharding.py): ZeRO Table 1, DDP buckets, FSDP2 gathering."""
from __future__ import annotations

import subprocess
import sys

import pytest

from estimator.estimate import estimate, model_states
from estimator.modelspec import load_model, spec_from_config
from estimator.params import count_params
from estimator.setup import Setup
from estimator.sharding import DDP_FIRST_BUCKET_BYTES, MAX_WORLD_SIZE, ddp_bucket_sizes, per_rank_states, smallest_world

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
              "max_position_embeddings": 256, "tie_word_embeddings": False}
SHARDINGS = ("ddp", "zero1", "zero2", "zero3", "fsdp")


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
        # whole step is monotone over powers of two, the resident shards over every N
        if sharding != "fsdp" or world & (world - 1) == 0:
            total = estimate(llama7b, ranked).total_bytes
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
                                              ("zero3", True), ("fsdp", True)])
def test_only_gathering_schemes_peak_inside_a_layer(llama7b, sharding, gathers):
    ranked = _ranked(llama7b, 8, sharding, precision="bf16")
    moment = ranked.backward_layer(saved=10**9, per_layer=10**7, working_set=10**6)
    assert (moment is not None) is gathers
    if gathers:  # middle layers: parameters, the prefetched next layer, the previous reduce-scatter input
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
