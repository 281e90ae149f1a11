"""KV caches beside the saved activations: what a training or eval forward's cache holds that
attention does not save already, transformers' DynamicCache (copies) against the older
tuple caches (attention's own tensors, estimator/archs tuple_cache switches)."""
from __future__ import annotations

from .archs import QKV, traits
from .kernels import kv_repeated, qkv_views, rotary_fp32_qk, sdpa_kernel
from .modelspec import ModelSpec
from .setup import Setup
from .units import FP32


def cache_copies_saved(spec: ModelSpec, setup: Setup) -> bool:
    """Whether attention saves a training forward's KV cache in addition to what it saves
    without one. ``DynamicLayer.update`` concatenates each layer's keys and values into new
    tensors and attention runs on those (transformers cache_utils.py: ``torch.cat``, then
    ``return self.keys, self.values``). Where q, k and v are views of one projection
    without RoPE (GPT-2's c_attn), a fused kernel saves q as it is, which keeps that whole
    output alive, and saves the cache's copies of k and v beside it."""
    return dynamic_cache(spec, setup) and not setup.grad_ckpt and qkv_views(spec, setup) \
        and sdpa_kernel(spec, setup) == "fused"


def dynamic_cache(spec: ModelSpec, setup: Setup) -> bool:
    """A forward with ``use_cache`` whose cache copies the keys and values (``DynamicCache``);
    transformers' older tuple caches hold attention's own tensors (traits tuple_cache, estimator/archs)."""
    return setup.use_cache and not traits(spec, setup).tuple_cache


def tuple_cache_beside_saved(spec: ModelSpec, setup: Setup) -> int:
    """What an old tuple cache holds beside the saved tensors during the forward: GPT-2's
    eager attention (and sdpa's math kernel) reshapes the (b, heads, s, d) views to
    (b * heads, s, d) for its matmuls, a copy for b > 1 (the views are what it saves for
    b = 1, _batch_one), so the
    matmuls save copies and the cache alone keeps c_attn's output; kernels that save their
    inputs as they are (sdpa) and OPT's contiguous copies leave nothing beside them."""
    tr, kernel = traits(spec, setup), sdpa_kernel(spec, setup)
    if tr.qkv is QKV.FUSED_VIEWS and kernel in ("eager", "math") and setup.batch > 1:
        return tuple_cache_bytes(spec, setup)
    if tr.qkv is QKV.FUSED_ROTATED and kernel in ("eager", "math") and setup.batch > 1 \
            and tuple_cache_bytes(spec, setup):
        # GPT-NeoX's cached value is a view of query_key_value's output (4.42.4
        # models/gpt_neox/modeling_gpt_neox.py:234, 257), which eager's matmul copies for b > 1
        # (the reshape to (b * heads, s, d)): the cache alone keeps that output; its key is the
        # rotated tensor attention saves
        return spec.num_layers * 3 * spec.q_dim * setup.batch * setup.seq * setup.precision.compute_bytes
    p = setup.precision.compute_bytes
    if tr.qkv is QKV.SEPARATE and kernel == "math" and tuple_cache_bytes(spec, setup):
        # sdpa's math kernel (BioGPT's attention dropout on CPU) saves a scaled copy of k, and
        # fp32 copies of k and v for a 16-bit dtype it upcasts (attention.cpp
        # _scaled_dot_product_attention_math): the tuple cache's own key (and value) are beside
        # them (4.46.0 models/biogpt/modeling_biogpt.py:319 ``past_key_value = (key_states, value_states)``)
        copies = 1 if p == FP32 else 2
        return spec.num_layers * copies * spec.kv_dim * setup.batch * setup.seq * p
    if kernel != "eager" and rotary_fp32_qk(spec, setup, p) and tuple_cache_bytes(spec, setup):
        # sdpa gets query and key cast back to the value's dtype (4.42.4
        # modeling_gpt_neox.py:552-554); the cache keeps the fp32 key (:257)
        return spec.num_layers * FP32 * spec.kv_dim * setup.batch * setup.seq
    return 0


def tuple_cache_bytes(spec: ModelSpec, setup: Setup) -> int:
    """What an old tuple cache holds once backward has freed the saved tensors: GPT-2's
    key and value are views of the fused c_attn output, which they keep whole (3 h per
    token and layer); OPT's are the contiguous (b, heads, s, d) copies attention made."""
    tr = traits(spec, setup)
    if not (setup.use_cache and tr.tuple_cache) or setup.grad_ckpt:
        return 0
    p = setup.precision.compute_bytes
    per_token = p * (3 * spec.q_dim if tr.qkv is QKV.FUSED_VIEWS else 2 * spec.kv_dim)
    if tr.qkv is QKV.FUSED_ROTATED:  # the rotated key, and the whole fused output its value views
        per_token = (FP32 if rotary_fp32_qk(spec, setup, p) else p) * spec.kv_dim + p * 3 * spec.q_dim
    return spec.num_layers * per_token * setup.batch * setup.seq


def cache_beside_saved(spec: ModelSpec, setup: Setup) -> float:
    """The fraction of a training forward's KV cache that no saved tensor holds: alive only
    while the model's outputs are. Kernels that save their k and v inputs as they are
    (flash, cuDNN, mem-efficient; eager matmuls without repeated heads) leave nothing; the
    math kernel saves a scaled copy of k and, for grouped heads or a half dtype it upcasts,
    of v (attention.cpp _scaled_dot_product_attention_math); eager attention saves
    repeat_kv's copies for grouped heads. Transformers turns the cache off under gradient
    checkpointing."""
    if not dynamic_cache(spec, setup) or setup.grad_ckpt:
        return 0.0
    grouped, kernel = spec.num_kv_heads < spec.num_heads, sdpa_kernel(spec, setup)
    fused = kernel == "fused" and not kv_repeated(spec, setup)  # repeated: the kernel saves copies
    k_kept = fused or (kernel == "eager" and not grouped)
    v_kept = fused or not grouped and (kernel == "eager" or setup.precision.compute_bytes == FP32)
    return ((not k_kept) + (not v_kept)) / 2
