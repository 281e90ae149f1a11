"""Which attention kernel a step runs and how its inputs and output are laid out: torch's
sdpa dispatch (flash, cuDNN, memory-efficient, math; sdp_utils.cpp select_sdp_backend),
eager attention's softmax dtype, and the views and copies around the kernel that decide
what attention saves (estimator/activations.py) and holds (estimator/caches.py)."""
from __future__ import annotations

from .archs import QKV, Softmax, traits
from .modelspec import ModelSpec
from .setup import Attention, Device, Setup
from .units import FP32, HALF
from .versions import parse_version


def eager_softmax_upcast(spec: ModelSpec, setup: Setup) -> bool:
    """Whether eager attention's softmax runs in fp32 and casts back: ``softmax(dtype=
    torch.float32).to(query.dtype)`` (the Llama family, OPT, GPT-NeoX from 4.49: 5.24
    models/llama/modeling_llama.py eager_attention_forward; models/gpt_neox/modeling_gpt_neox.py:158),
    rather than in the compute dtype (GPT-2 ``softmax(attn_weights).type(value.dtype)``, 5.24
    models/gpt2/modeling_gpt2.py:64-67; BioGPT; GPT-NeoX's own attention before 4.49,
    4.42.4 :281-301). Read by every eager term: saved activations, a layer's backward working
    set (sharding.layer_working_set) and the no-grad prefill (estimate.prefill_transient)."""
    return traits(spec, setup).eager_softmax is Softmax.UPCAST


def eager_softmax_bytes(spec: ModelSpec, setup: Setup) -> int:
    """Bytes per element of eager attention's softmax output: fp32 where the model upcasts,
    and where CUDA autocast runs softmax (autocast_mode.cpp's fp32 cast list; CPU autocast
    has no softmax entry); else the compute dtype."""
    if eager_softmax_upcast(spec, setup) or (setup.device is Device.CUDA and setup.precision.is_autocast):
        return FP32
    return setup.precision.compute_bytes


def eager_softmax_transient(spec: ModelSpec, setup: Setup) -> int:
    """Bytes per score element the softmax itself holds while it runs: its output and, where
    that is fp32 and its input is not, the input converted to fp32 first."""
    out, p = eager_softmax_bytes(spec, setup), setup.precision.compute_bytes
    return out + (FP32 if out == FP32 and p != FP32 else 0)


def eager_softmax_saved(spec: ModelSpec, setup: Setup) -> int:
    """Bytes per score element that eager attention saves from its softmax: the output, and
    where the model upcasts, the cast copy the value matmul saves (none in fp32)."""
    p = setup.precision.compute_bytes
    return eager_softmax_bytes(spec, setup) + (p if eager_softmax_upcast(spec, setup) and p != FP32 else 0)


def cuda_sdpa_backend(spec: ModelSpec, setup: Setup) -> str:
    """The sdpa kernel torch's CUDA dispatcher picks for this model in training (no mask,
    ``enable_gqa`` for grouped heads; sdp_utils.cpp select_sdp_backend; the same rules the
    sim applies, profiler/measure/sim.py): cuDNN or flash for 16-bit inputs (autocast casts
    sdpa's inputs) up to head_dim 256, mem-efficient for fp32 without grouped heads,
    math otherwise. cuDNN and flash save the same tensors, so they are one answer here."""
    if setup.device is not Device.CUDA:
        return "cpu"
    d, grouped = spec.head_dim, spec.num_kv_heads < spec.num_heads and not kv_repeated(spec, setup)
    if setup.precision.compute_bytes == HALF and d <= 256 and has_flash(setup):
        return "fused"
    if not grouped and d % (8 if setup.precision.compute_bytes == HALF else 4) == 0:
        return "efficient"
    return "math"


def math_kernel_extra(spec: ModelSpec, setup: Setup) -> int:
    """What sdpa's math kernel holds at its softmax beyond the scaled q, the repeated k and v
    and two (b, heads, s, s) fp32 score matrices (attention.cpp ``_scaled_dot_product_attention_math``,
    read as the ops it dispatches on torch 2.13): 16-bit inputs are upcast first and the fp32
    copies stay referenced to the end -- q's (``query_acc``) and, where grouped heads are
    repeated into new tensors, k's and v's; ``is_causal`` (transformers passes it with no
    mask) builds the causal mask as a bool (s, s) ``tril`` converted to an additive fp32
    (s, s) one, which the scores are added to. Measured with the storage tracker on the op
    alone (fp16, 15 query and 5 key/value heads, s1024): two score matrices, the mask and
    4 q + 2 kv fp32 per token, to the byte."""
    T, s = setup.batch * setup.seq, setup.seq
    grouped = spec.num_kv_heads < spec.num_heads and not kv_repeated(spec, setup)
    upcast = FP32 * (spec.q_dim + (2 * spec.kv_dim if grouped else 0)) * T \
        if setup.precision.compute_bytes != FP32 else 0
    return upcast + FP32 * s * s


def has_flash(setup: Setup) -> bool:
    """Flash attention runs on compute capability 8.0 and newer since torch 2.2 moved to
    FlashAttention-2 (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp
    check_flash_attention_hardware_support: "[sm80, sm90]" in 2.2-2.3, "[sm80, sm121]"
    later; torch 2.0-2.1's first FlashAttention took sm75 too), and cuDNN's has the same
    floor; an older GPU (Turing, 7.5) runs 16-bit sdpa on the memory-efficient kernel,
    which writes its output (b, s, heads, d) and pads its logsumexp."""
    cc = setup.compute_capability
    if not cc:
        return True
    have = tuple(int(x) for x in cc.split("."))
    torch_version = dict(setup.semantics.versions).get("torch")
    fa1 = torch_version is not None and parse_version(torch_version) < (2, 2)
    return have >= (8, 0) or (fa1 and have >= (7, 5))


#: the largest head size transformers hands sdpa grouped keys and values for without repeating
#: them (5.24 integrations/sdpa_attention.py:50-51 ``use_gqa_in_sdpa``: beyond it CUDA would fall
#: back to the math kernel, so repeat_kv copies them and sdpa gets equal heads)
SDPA_GQA_MAX_HEAD_DIM = 256


def kv_repeated(spec: ModelSpec, setup: Setup) -> bool:
    """Grouped keys and values reach sdpa repeated to every head (repeat_kv), as
    transformers < 4.54 does (Semantics.sdpa_repeats_kv), and later releases for head sizes
    over :data:`SDPA_GQA_MAX_HEAD_DIM` (Gemma 4's full-attention layers)."""
    return spec.num_kv_heads < spec.num_heads and (setup.semantics.sdpa_repeats_kv
                                                   or spec.head_dim > SDPA_GQA_MAX_HEAD_DIM)


def sdpa_kernel(spec: ModelSpec, setup: Setup) -> str:
    """eager, math or fused (flash, cuDNN, mem-efficient: kernels that save their inputs)."""
    if setup.attn is Attention.EAGER:
        return "eager"
    if setup.device is Device.CPU:
        return "math" if spec.attn_dropout > 0 else "fused"
    return "math" if cuda_sdpa_backend(spec, setup) == "math" else "fused"


def qkv_views(spec: ModelSpec, setup: Setup) -> bool:
    """q, k and v are views of one projection without RoPE (GPT-2's c_attn)."""
    return traits(spec, setup).qkv is QKV.FUSED_VIEWS


def fused_qkv(spec: ModelSpec, setup: Setup) -> bool:
    """q, k and v are slices of one rotated projection (Phi-3's qkv_proj; GPT-NeoX's
    query_key_value, whose q and k are rotated into new tensors by ``torch.cat`` while v
    stays a view of the projection: 5.24 models/gpt_neox/modeling_gpt_neox.py:138, 196;
    4.42.4 :234, 248-249)."""
    return traits(spec, setup).qkv is QKV.FUSED_ROTATED


def attention_output_copied(spec: ModelSpec, setup: Setup) -> bool:
    """Whether the merged heads reach o_proj as a copy of the attention output, made by
    ``transpose(1, 2).contiguous()``: eager and math attention write (b, heads, s, d), so
    it copies; mem-efficient attention always writes (b, s, heads, d) and it copies
    nothing; flash (CPU and CUDA) and cuDNN lay their output out like the query
    (``empty_like(query)`` in _meta_registrations.py), which is (b, s, heads, d) after a
    projection's view and RoPE, but not when q is sliced out of a fused projection or the
    rotary embedding concatenates it anew (traits ``rotary_concat``). On CPU, sdpa with dropout
    runs math."""
    if setup.attn is Attention.EAGER:
        return True
    # transformers < 4.56 hands sdpa contiguous (b, heads, s, d) queries (Semantics.sdpa_inputs_contiguous)
    # (GPT-2's own attention classes before 4.48 pass c_attn's views as they are)
    contiguous = setup.semantics.sdpa_inputs_contiguous and not traits(spec, setup).sdpa_gets_views
    like_query_copies = fused_qkv(spec, setup) or contiguous or traits(spec, setup).rotary_concat
    if setup.device is Device.CPU:
        return spec.attn_dropout > 0 or like_query_copies
    backend = cuda_sdpa_backend(spec, setup)
    return backend == "math" or (backend == "fused" and like_query_copies)


def rotary_fp32_qk(spec: ModelSpec, setup: Setup, p: int) -> bool:
    """The query and key leave the rotary embedding in fp32 (GPT-NeoX < 4.45, traits
    ``rotary_fp32``) when the weights are 16-bit."""
    return p != FP32 and traits(spec, setup).rotary_fp32


def masked_layers(spec: ModelSpec, setup: Setup) -> int:
    """Layers whose sdpa call gets an explicit mask: the sliding-window layers once the
    sequence is as long as the window (transformers masking_utils.py ``_ignore_causal_mask_sdpa``:
    ``kv_length >= local_attention_size`` keeps it); full-attention layers pass ``is_causal``."""
    tr = traits(spec, setup)
    if setup.attn is not Attention.SDPA or not tr.sliding_layers or setup.seq < tr.sliding_window:
        return 0
    return tr.sliding_layers


def masked_layer_bytes(spec: ModelSpec, setup: Setup) -> int:
    """Per token, what a masked sdpa layer saves beyond an unmasked one: the mask sdpa converts
    to the query's dtype for the kernel, (b, 1, s, s) (aten/src/ATen/native/transformers/
    attention.cpp ``convert_boolean_attn_mask``; measured p bytes per element per layer on the
    sim, cuda and cpu semantics, Gemma 3 and Mistral), and, for grouped heads, ``repeat_kv``'s copies of k and v:
    transformers passes ``enable_gqa`` only without a mask (integrations/sdpa_attention.py
    ``use_gqa_in_sdpa``), and one key/value head repeats as a view (a size-1 dim), so only
    1 < kv heads < heads copies."""
    p = setup.precision.compute_bytes
    kv, a = spec.num_kv_heads, spec.num_heads
    repeat = 2 * (spec.q_dim - spec.kv_dim) * p if 1 < kv < a else 0
    return p * setup.seq + repeat
