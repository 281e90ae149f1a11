"""Activation memory: what autograd saves for backward, term by term, per architecture.

The starting point is Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Sec. 4.1): per layer sbh(34 + 5as/h) bytes for a GPT block
with 2-byte activations and 1-byte dropout masks. Here every term is derived from the
ops of the transformers modeling file instead (RMSNorm upcasts, SwiGLU, GQA, fused
attention kernels, dropout masks on cpu vs cuda, LoRA adapter inputs, MoE routing), and
checked against the profiler's tracked storages on small models
(``tests/test_profiler.py``, test_estimate_matches_sim_per_phase). Notation: T = batch*seq tokens, h hidden, f
intermediate, a heads, kv kv-heads, d head dim, s seq, p compute bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .archs import MLP, Norm, QKNorm, Router, arch_of, traits
from .caches import cache_copies_saved, dynamic_cache
from .kernels import (
    attention_output_copied,
    cuda_sdpa_backend,
    eager_softmax_bytes,
    eager_softmax_saved,
    fused_qkv,
    kv_repeated,
    masked_layer_bytes,
    masked_layers,
    qkv_views,
    rotary_fp32_qk,
    sdpa_kernel,
)
from .modelspec import ModelSpec
from .params import Linear, layer_linears, lora_targets
from .setup import Attention, Device, Mode, Quant, Setup
from .units import FP32, HALF

#: bytes of an int64 index (torch.topk's indices, torch.sort's permutation, and what an
#: advanced-indexing op saves for its backward)
INT64 = 8


@dataclass(frozen=True)
class Activations:
    """Saved bytes of one decoder layer (named terms), times ``layers``, plus the rest."""

    per_layer: dict[str, int]
    layers: int
    outside: dict[str, int] = field(default_factory=dict)  # once per model (embedding dropout, rope tables)

    @property
    def layer_bytes(self) -> int:
        return sum(self.per_layer.values())

    @property
    def total(self) -> int:
        return self.layers * self.layer_bytes + sum(self.outside.values())


def stream_bytes(setup: Setup) -> int:
    """Bytes per element of the residual stream (fp32 under autocast, else the compute dtype)."""
    return _dtypes(setup)[1]


def _dtypes(setup: Setup):
    """(compute bytes p, residual-stream bytes, linear-input bytes)."""
    p = setup.precision.compute_bytes
    if setup.precision.is_autocast:
        # torch.autocast keeps the residual stream fp32 (embeddings and adds run in fp32)
        # and casts every matmul input to half: linears save the half copy.
        return p, FP32, HALF
    return p, p, p


def dropout_mask_bytes(setup: Setup, p: int) -> int:
    """Per element saved by a training dropout (aten/src/ATen/native/Dropout.cpp): the
    fused CUDA kernel (native_dropout) keeps a bool mask; the CPU path multiplies by a
    noise tensor of the input's dtype and saves it."""
    return 1 if setup.device is Device.CUDA else p


def _attention_kernel(spec: ModelSpec, setup: Setup, p: int) -> dict[str, int]:
    """Per token, bytes saved by the attention core (after q/k/v projections)."""
    a, d, s = spec.num_heads, spec.head_dim, setup.seq
    q, kvd = a * d, spec.kv_dim
    out: dict[str, int] = {}
    dropout = spec.attn_dropout > 0
    if setup.attn is Attention.SDPA and setup.device is Device.CPU and dropout:
        # sdpa's CPU flash kernel has no dropout: the math fallback upcasts to fp32 and saves
        # q, k, v (repeated to a heads), the softmax, the dropout mask and the dropped scores
        out["attn_qkv"] = FP32 * 3 * q
        out["attn_scores"] = 3 * FP32 * a * s
        return out
    if setup.attn is Attention.SDPA and cuda_sdpa_backend(spec, setup) == "math":
        # _scaled_dot_product_attention_math (aten/src/ATen/native/transformers/attention.cpp)
        # computes in fp32 (allowFP16BF16ReductionMathSDP is off by default) and repeats
        # grouped K/V to a heads: it saves the scaled q and transposed scaled k, the repeated
        # v, the probabilities (_safe_softmax), and with dropout the bool mask and its output
        out["attn_qkv"] = FP32 * 3 * q
        out["attn_scores"] = FP32 * a * s + ((1 + FP32) * a * s if dropout else 0)
        return out
    if setup.attn is Attention.EAGER and rotary_fp32_qk(spec, setup, p):
        # GPT-NeoX < 4.45 with 16-bit weights: the rotated q and k are fp32 (the rotary_fp32
        # trait), so baddbmm saves them in fp32 and scores in fp32, the softmax
        # keeps its fp32 output and ``.to(value.dtype)`` (4.42.4 modeling_gpt_neox.py:301) the
        # copy the value matmul saves with its copy of v
        out["attn_qkv"] = (2 * FP32 + p) * q
        out["attn_scores"] = (FP32 + p) * a * s
        return out
    if setup.attn is Attention.EAGER:
        # repeat_kv materialises GQA keys/values to a heads (modeling_llama.repeat_kv)
        out["attn_qkv"] = p * 3 * q  # (b, a, s, d) q, k, v each (k, v repeated to a heads)
        # (b, a, s, s): the softmax [and its cast, which a dropout consumes: then only the dropout's
        # output is saved, for the value matmul]
        out["attn_scores"] = (eager_softmax_bytes(spec, setup) if dropout else eager_softmax_saved(spec, setup)) * a * s
        tr = traits(spec, setup)
        if tr.attn_sinks:
            # gpt-oss (5.24 models/gpt_oss/modeling_gpt_oss.py:243-253): the sink logit is concatenated
            # as an (s + 1)-th column, the row max is subtracted (``max(dim=-1)`` saves its int64
            # argmax) and the softmax, in the scores' dtype, saves its (heads, s, s + 1) output; the
            # value matmul reads the sink-free columns as a view of it (no copy), unless a cast to
            # the value's dtype copies them (CUDA autocast runs softmax in fp32)
            sm = eager_softmax_bytes(spec, setup)
            out["attn_scores"] = sm * a * (s + 1) + (p * a * s if sm != p else 0)
            out["attn_sink_max"] = INT64 * a
        if tr.attn_softcap:
            out["attn_softcap"] = p * a * s  # tanh output of attention logit soft-capping
        if tr.eager_clamps_scores:
            out["attn_clamp"] = p * a * s  # torch.max keeps the masked scores
        if dropout:
            out["attn_dropout"] = (dropout_mask_bytes(setup, p) + p) * a * s
        return out
    # flash / memory-efficient kernels save q, k and v (GQA at kv heads: transformers passes
    # enable_gqa), the output and a fp32 logsumexp per (head, query) (Dao 2023; torch SDPA)
    # transformers < 4.54 repeats grouped k and v to every head first (repeat_kv's copies
    # are what the kernel saves; estimator/versions.py)
    # (one key/value head repeats as a view: repeat_kv's expand of a size-1 dim and reshape copy nothing)
    out["attn_qkv"] = p * (q + 2 * (q if kv_repeated(spec, setup) and spec.num_kv_heads > 1 else kvd))
    if fused_qkv(spec, setup) and not dynamic_cache(spec, setup):
        # one fused projection (Phi-3's qkv_proj): v is a view of its output, so the whole
        # output stays alive beside the rotated q and k the kernel saves (with a KV cache,
        # attention runs on the cache's copy of v instead)
        out["attn_qkv"] += p * (q + kvd)
    if cache_copies_saved(spec, setup):
        out["attn_cache"] = p * 2 * kvd
    out["attn_out"] = p * q  # (b, s, a, d) kernel output
    out["attn_lse"] = FP32 * a  # (b, a, s) fp32 logsumexp
    if setup.device is Device.CUDA and cuda_sdpa_backend(spec, setup) == "efficient":
        # mem-efficient attention pads its logsumexp to 32 queries (_meta_registrations.py)
        out["attn_lse"] = FP32 * a * -(-s // 32) * 32 // s
    return out


def _input_linears(spec: ModelSpec) -> int:
    """How many linears read each normed input (autocast casts the input once per linear):
    every linear of a block but its output projection, fused MoE experts aside."""
    return sum(1 for lin in layer_linears(spec) if shares_block_input(spec, lin) and not lin.fused_experts)


def training_activations(spec: ModelSpec, setup: Setup) -> Activations:
    """Bytes autograd saves during the forward of one training step.

    Every term is linear in the batch (per-token bytes times b*s), so the batch-1 result
    is memoised per (model, :attr:`Setup.per_sequence`) and scaled."""
    one = _training_activations_b1(spec, setup.per_sequence)
    b = setup.batch
    out = _batch_one(spec, setup, one) if b == 1 else Activations(
        per_layer={k: v * b for k, v in one.per_layer.items()}, layers=one.layers,
        outside={k: v * b for k, v in one.outside.items()})
    merged = lora_expert_weights(spec, setup)
    # the layers that hold the fused experts (not a family's first dense layers, Arch.dense_layers)
    moe_layers = spec.num_layers - min(arch_of(spec).dense_layers(spec), spec.num_layers)
    if merged:
        out = Activations(per_layer=out.per_layer, layers=out.layers,
                          outside={**out.outside, "lora_expert_weights": moe_layers * merged})
    tr = traits(spec, setup)
    if tr.local_rotary and tr.sliding_layers:
        # the sliding layers' own rotary cos and sin, (1, s, head_dim) each in the compute dtype,
        # which their rotary multiplications save whatever the batch (measured on the sim)
        out = Activations(per_layer=out.per_layer, layers=out.layers, outside={
            **out.outside, "local_rotary": 2 * setup.seq * spec.head_dim * setup.precision.compute_bytes})
    if tr.global_rotary_dim:
        # the full layers' own cos and sin, (1, s, d) each, which their rotary multiplications save
        # (measured on a real CPU step, Gemma 4)
        out = Activations(per_layer=out.per_layer, layers=out.layers, outside={
            **out.outside, "global_rotary": 2 * setup.seq * tr.global_rotary_dim * setup.precision.compute_bytes})
    return out


def _batch_one(spec: ModelSpec, setup: Setup, one: Activations) -> Activations:
    """What only a batch of one saves where q, k and v are views of one projection without
    RoPE (GPT-2's c_attn): the matmuls' ``reshape(b * heads, s, d)`` is a view when b is 1,
    so where sdpa falls back to its math kernel on CPU (attention dropout) the matmul saves
    the whole projection output (q and k too) instead of a copy of v, and eager attention
    with a KV cache keeps it beside the cache's copies of k and v."""
    math_on_cpu = setup.attn is Attention.SDPA and setup.device is Device.CPU and spec.attn_dropout > 0
    if setup.attn is Attention.EAGER and traits(spec, setup).eager_value_view_b1 and not dynamic_cache(spec, setup):
        # GPT-NeoX's value is a view of query_key_value's output; eager's matmul reshapes it to
        # (b * heads, s, d), a view only for b = 1, so it saves the whole output rather than a
        # copy of v (5.24 models/gpt_neox/modeling_gpt_neox.py:161; 4.42.4 :309)
        extra = setup.precision.compute_bytes * 2 * spec.q_dim * setup.seq
        return Activations(per_layer={**one.per_layer, "attn_v_view": extra}, layers=one.layers, outside=one.outside)
    if setup.attn is Attention.EAGER and qkv_views(spec, setup) and dynamic_cache(spec, setup) and not setup.grad_ckpt:
        # eager's matmul reshapes q (b, heads, s, d) to (b * heads, s, d): a view only for b = 1,
        # which keeps the projection output alive beside the cache's copies of k and v
        extra = setup.precision.compute_bytes * 2 * spec.kv_dim * setup.seq
        return Activations(per_layer={**one.per_layer, "attn_cache": extra}, layers=one.layers, outside=one.outside)
    fused_views = qkv_views(spec, setup) and not dynamic_cache(spec, setup)  # a cache hands attention copies
    # (16-bit inputs: the math kernel's fp32 upcast of v is the copy its matmul saves, no view;
    # measured on a bf16 GPT-2 QLoRA cpu step, where counting the view was +2.9 %)
    if not (math_on_cpu and fused_views and setup.precision.compute_bytes == FP32):
        return one
    extra = FP32 * 2 * spec.q_dim * setup.seq
    return Activations(per_layer={**one.per_layer, "attn_v_view": extra}, layers=one.layers, outside=one.outside)


@lru_cache(maxsize=8192)
def _training_activations_b1(spec: ModelSpec, setup: Setup) -> Activations:
    p, resid, lin_in = _dtypes(setup)
    h, f = spec.hidden_size, spec.intermediate_size
    # the layers' weights get gradients (full training; FSDP1 LoRA with layer units: setup.FsdpWrap),
    # so their modules save what a weight's gradient reads; the root's (embedding, final norm, head)
    # only in full training
    trainable_base = setup.trains_layer_weights
    head_trains = setup.mode is Mode.FULL
    terms: dict[str, int] = {}
    tr = traits(spec, setup)
    norms_before_linear = 2  # attention input and MLP input
    if tr.norm is not Norm.LAYER:
        # LlamaRMSNorm: x.to(fp32) (a copy unless already fp32), pow/mul save it; rsqrt
        # saves a fp32 scalar per token; `weight * x.to(dtype)` saves x.to(dtype) when the
        # weight is trainable (Gemma's (1 + weight) form keeps it fp32).
        normed = (FP32 if tr.norm in (Norm.RMS_ONE_PLUS, Norm.RMS_WEIGHT_FP32) else resid) * h \
            if trainable_base else 0
        per_norm = FP32 * h + FP32 + normed
        frozen_norm = FP32 * h + FP32  # a frozen weight's norm (the root's under layer units)
        weight_only = normed  # a trainable weight's norm on an input needing no gradient
    else:
        # native_layer_norm saves its input plus fp32 mean and rstd per token
        per_norm = frozen_norm = weight_only = resid * h + 2 * FP32
    terms["norms"] = per_layer_norms(spec, setup, per_norm)
    # inputs of the attention and MLP input projections: one tensor feeds q/k/v and one
    # gate/up, except under autocast, where every linear saves its own half cast
    if trainable_base:
        copies = _input_linears(spec) if setup.precision.is_autocast else norms_before_linear
        terms["linear_inputs"] = copies * lin_in * h
    terms.update(_attention_kernel(spec, setup, p))
    if tr.qk_norm is not QKNorm.NONE:
        terms["qk_norm"] = _qk_norm_saved(spec, tr, lin_in, trainable_base)
    if trainable_base and attention_output_copied(spec, setup):
        terms["o_proj_input"] = lin_in * spec.q_dim
    mlp_tokens = spec.experts_per_token if spec.num_experts else 1
    if setup.mode in (Mode.LORA, Mode.QLORA) and not trainable_base:
        experts_trainable = any(lin.copies > 1 for lin in lora_targets(spec, setup.lora_targets))
    else:
        experts_trainable = trainable_base
    if tr.mlp is MLP.CLAMPED_SWIGLU:
        # gpt-oss's _apply_gate (5.24 models/gpt_oss/modeling_gpt_oss.py:82-88) on the (S, 2f)
        # gate_up output: both clamps save the output they view (2f), ``gate * sigmoid(gate *
        # alpha)`` saves the clamped gate and the sigmoid's output, ``(up + 1) * glu`` saves up + 1
        # and glu (f each); the down projection's grouped matmul saves the product only for its
        # weights' gradient (frozen experts: none)
        terms["mlp"] = mlp_tokens * p * f * (6 + (1 if experts_trainable else 0))
    elif tr.mlp in (MLP.GATED, MLP.GATED_FUSED):
        # act(gate) saves gate; mul saves act(gate) and up; down_proj saves the product
        terms["mlp"] = mlp_tokens * p * f * (4 if trainable_base else 3)
    elif tr.mlp is MLP.NEW_GELU and setup.device is Device.CUDA and setup.precision.is_autocast:
        # NewGELUActivation under CUDA autocast: pow runs on an fp32 copy of x, which it
        # saves, so tanh(.) and 1+tanh(.) are fp32 too; 0.5*x stays half; c_proj saves a half
        # cast of the fp32 product
        terms["mlp"] = 3 * FP32 * f + HALF * f + (HALF * f if trainable_base else 0)
    elif tr.mlp is MLP.NEW_GELU:
        # NewGELUActivation is a Python formula: saves x, tanh(.), 0.5*x and 1+tanh(.);
        # c_proj saves the product
        terms["mlp"] = p * f * (5 if trainable_base else 4)
    elif tr.mlp is MLP.GELU:
        # GELUActivation is F.gelu (activations.py), which saves its input; the output
        # projection (GPT-NeoX dense_4h_to_h, BioGPT fc2) saves the activation's output
        # (5.24 models/gpt_neox/modeling_gpt_neox.py:46-48; models/biogpt/modeling_biogpt.py:298-301)
        terms["mlp"] = p * f * (2 if trainable_base else 1)
    else:
        # ReLU saves its output, which fc2 saves too (one storage)
        terms["mlp"] = p * f
    if spec.num_experts:
        # MoE routing (MixtralSparseMoeBlock): router logits, fp32 softmax, and the gathered
        # expert inputs (S, h), which the experts' matmul saves only for its weights' gradient:
        # autograd saves an input of a matmul for the other operand's gradient alone, so frozen
        # experts (LoRA elsewhere) save none (measured on the sim: Qwen3-MoE LoRA on attention,
        # 64 MiB a layer at 2 x 1024 tokens, +2.4 % before on 4 layers)
        if tr.router in (Router.TOPK_SOFTMAX, Router.TOPK_SOFTMAX_FP32):
            # gpt-oss's router (modeling_gpt_oss.py:126-130): topk of the logits saves its int64
            # indices, the softmax over the k values its output (the logits themselves are freed);
            # the grouped_mm forward (integrations/moe.py:440-529) gathers by ``perm // k``, the
            # weights by ``perm`` and puts the outputs back by ``inv_perm`` (an int64 index each,
            # saved by the indexing), gathers the expert biases by ``expert_ids_g`` (saved while the
            # biases train) and saves the gathered routing weights for the down output's gradient
            bias_index = any(lin.fused_experts and lin.bias for lin in layer_linears(spec)) and trainable_base
            # (GraniteMoe's softmax runs on fp32 logits: its saved output is fp32, the weights the
            # experts gather are cast back, modeling_granitemoe.py:129-131)
            softmax_out = FP32 if tr.router is Router.TOPK_SOFTMAX_FP32 else p
            terms["moe_routing"] = mlp_tokens * (INT64 * (4 + (1 if bias_index else 0)) + softmax_out + p) \
                + (mlp_tokens * lin_in * h if experts_trainable else 0)
        else:
            terms["moe_routing"] = (p + FP32) * spec.num_experts \
                + (mlp_tokens * lin_in * h if experts_trainable else 0)
        # transformers 5's grouped_mm experts (integrations/moe.py grouped_mm_experts_forward, the
        # default experts implementation: modeling_utils.py get_correct_experts_implementation):
        # the routing-weight product ``proj_out * sample_weights_g`` saves the (S, h) down-projection
        # output, S = tokens x top-k (measured on the sim: Mixtral 32 MiB, Qwen3-MoE 64 MiB a layer)
        terms["moe_weighted"] = mlp_tokens * p * h
    if spec.resid_dropout > 0:
        terms["resid_dropout"] = 2 * dropout_mask_bytes(setup, p) * h
    if setup.mode in (Mode.LORA, Mode.QLORA):
        terms.update(_lora_terms(spec, setup))
    if setup.mode is Mode.QLORA and setup.quant is Quant.INT8:
        terms["int8_inputs"] = _int8_inputs(spec, setup)
    terms, dense_delta, prefix = arch_of(spec).saved_quirk(spec, setup, terms)
    T = setup.batch * setup.seq
    per_layer = {k: v * T for k, v in terms.items() if v}
    outside = {}
    dense = min(arch_of(spec).dense_layers(spec), spec.num_layers)
    if dense and dense_delta:  # the dense-MLP layers before the repeated (MoE) ones (Arch.saved_quirk)
        outside["dense_layers"] = dense * dense_delta * T
    if prefix:  # the layers before the first adapter (Arch.saved_quirk)
        outside["frozen_prefix"] = prefix * T
    other = arch_of(spec).other_layers_saved(spec, setup, terms)
    if other:  # layers of further kinds beside the repeated one (Arch.other_layers)
        outside["other_layers"] = other * T
    masked = masked_layers(spec, setup)
    if masked:  # sliding-window layers at a sequence as long as the window (kernels.masked_layers)
        outside["masked_layers"] = masked * masked_layer_bytes(spec, setup) * T
    # Under LoRA without checkpointing the embedding output needs no gradient (frozen
    # embeddings; peft's enable_input_require_grads only comes with checkpointing), and
    # autograd saves only for inputs that need one: the embedding dropout keeps no mask and
    # the first layer's first norm, which reads that output (pre-LN), saves nothing
    frozen_input = setup.mode in (Mode.LORA, Mode.QLORA) and not setup.grad_ckpt
    if frozen_input and tr.parallel_residual and not any(
            lin.group == "mlp" for lin in lora_targets(spec, setup.lora_targets)):
        # GPT-NeoX's parallel residual: the first layer's MLP reads it too, and the adapters'
        # output joins only at the first attention
        outside["first_layer_frozen"] = -(per_layer_norms(spec, setup, per_norm) + terms["mlp"]) * T
    elif frozen_input and tr.pre_norm and trainable_base:
        # layer units: the first norm's weight gets a gradient, so what that reads is saved
        outside["first_layer_frozen"] = -(per_norm - weight_only) * T
    elif frozen_input and tr.pre_norm:
        outside["first_layer_frozen"] = -per_norm * T
        if "int8_inputs" in terms:  # nor do the first block's 8-bit linears, their input frozen
            outside["first_layer_frozen"] -= _int8_inputs(spec, setup, first_block=True) * T
        targets = {lin.name for lin in lora_targets(spec, setup.lora_targets)}
        if "k_proj" in {lin.name for lin in layer_linears(spec)} and "k_proj" not in targets \
                and sdpa_kernel(spec, setup) in ("eager", "math"):
            # nor does the first layer's key (k_proj unadapted, its input frozen): the score
            # matmul keeps k for q's gradient but not q, which only k's gradient reads (mm's
            # derivative saves each operand only for the other's gradient); the math kernel's
            # q is its fp32 scaled copy
            outside["first_layer_frozen"] -= (FP32 if sdpa_kernel(spec, setup) == "math" else p) * spec.q_dim * T
    if spec.embd_dropout > 0 and not frozen_input:
        outside["embed_dropout"] = dropout_mask_bytes(setup, p) * h * T
    # after the last layer: the final norm saves what a layer's norm saves, and a trainable
    # LM head saves its input (the final norm's output; a half cast of it under autocast)
    outside["final_norm"] = (per_norm if head_trains else frozen_norm) * T
    if head_trains:
        outside["head_input"] = lin_in * h * T
    return Activations(per_layer=per_layer, layers=spec.num_layers, outside=outside)


def _qk_norm_saved(spec: ModelSpec, tr, in_bytes: int, trainable: bool) -> int:
    """Per token, what the query and key norms save (Qwen3's per-head ``q_norm``/``k_norm``,
    OLMo 2's over all heads): as a layer's RMSNorm, the fp32 upcast of the projection's output
    (its input itself when fp32), an fp32 rsqrt per head (or per token), and where the weight
    is trainable ``x.to(dtype)`` (fp32 in Gemma's ``(1 + weight)`` form)."""
    heads = (spec.num_heads, spec.num_kv_heads) if tr.qk_norm is QKNorm.HEAD else (1, 1)
    normed = FP32 if tr.qk_norm_kind in (Norm.RMS_ONE_PLUS, Norm.RMS_WEIGHT_FP32) else in_bytes
    return sum(FP32 * dim + FP32 * scalars + (normed * dim if trainable else 0)
               for dim, scalars in ((spec.q_dim, heads[0]), (spec.kv_dim, heads[1])))


def lora_expert_weights(spec: ModelSpec, setup: Setup) -> int:
    """Bytes per layer that LoRA on fused 3-D expert parameters saves whatever the tokens: peft
    (0.21) parametrizes each targeted stack with ``baddbmm(W, lhs, rhs)`` (tuners/lora/layer.py
    ``_LoraFactorsProxy``), a new weight-sized tensor in the parameter's dtype made once per
    forward (``parametrize.cached``), which the grouped matmul saves for its input's gradient
    (measured on the sim: Mixtral's gate_up and down stacks, 2.8 GB a layer in bf16). The baddbmm
    also saves its two factors, which ``get_delta_factors`` casts from the adapters' fp32 to the
    stack's dtype (``lhs.to(param.dtype), rhs.to(param.dtype)``, layer.py:2525-2541): a copy of the
    target's LoRA weights in that dtype where it is not fp32 (measured on the sim: DeepSeek-V3
    reduced, 16 experts, r 16, 2.1 MiB a layer, -0.55 % of the all-linear backward without it)."""
    if setup.mode not in (Mode.LORA, Mode.QLORA):
        return 0
    pb = setup.precision.param_bytes
    fused = [lin for lin in lora_targets(spec, setup.lora_targets) if lin.fused_experts]
    factors = sum(setup.lora_rank * lin.lora_rank_multiplier() * (lin.in_features + lin.out_features)
                  for lin in fused) * pb if pb != FP32 else 0
    return sum(lin.copies * lin.in_features * lin.out_features for lin in fused) * pb + factors


def shares_block_input(spec: ModelSpec, lin: Linear) -> bool:
    """Whether ``lin`` reads its block's normed input (q/k/v, gate/up, c_attn, fc1), which
    the other input projections of the block read too, rather than a tensor of its own (the
    block's output projection: o_proj, down_proj, c_proj, fc2)."""
    group = [x for x in layer_linears(spec) if x.group == lin.group]
    return lin is not group[-1]


def per_layer_norms(spec: ModelSpec, setup: Setup, per_norm: int) -> int:
    """Per token, what one layer's norms save. GPT-NeoX's parallel residual: input_layernorm
    and post_attention_layernorm both read the layer input (5.24
    models/gpt_neox/modeling_gpt_neox.py:250, 261; 4.42.4 :754, 769), saved once."""
    out = spec.norms_per_layer * per_norm
    if traits(spec, setup).parallel_residual:
        out -= (spec.norms_per_layer - 1) * _dtypes(setup)[1] * spec.hidden_size
    return out


def _input_already_saved(spec: ModelSpec, setup: Setup, lin: Linear) -> bool:
    """Whether an output projection's input is a tensor the frozen model saves anyway, so an
    fp32 adapter reading it adds nothing: the attention output a fused sdpa kernel saves
    (it is laid out (b, s, heads, d), so the transpose and ``contiguous()`` before o_proj
    copy nothing), and a non-gated ReLU's output (OPT's fc2 input)."""
    if lin.group == "attention":
        return "attn_out" in _attention_kernel(spec, setup, setup.precision.compute_bytes) \
            and not attention_output_copied(spec, setup)
    return traits(spec, setup).mlp is MLP.RELU


def _lora_terms(spec: ModelSpec, setup: Setup) -> dict[str, int]:
    """peft LoRA Linear: x -> dropout (identity at 0) -> cast to the adapter dtype ->
    lora_A (saves its input) -> lora_B (saves the r values). peft keeps adapters fp32
    (``autocast_adapter_dtype=True``), so:

    - a 16-bit base: each adapter copies its input to fp32 (``_cast_input_dtype``);
    - an fp32 base: no copy, so adapters reading one tensor (q and v on the attention
      input) save it once;
    - autocast over an fp32 base: no peft copy, but autocast casts lora_A's input to half
      for each adapter (activations are not cached, autocast_mode.cpp cached_cast), and
      lora_B's input is lora_A's half output."""
    r = setup.lora_rank
    targets = lora_targets(spec, setup.lora_targets)
    if setup.precision.is_autocast:
        return {"lora_adapters": sum(HALF * (lin.in_features + r) for lin in targets)}
    if setup.adapter_bytes == HALF:
        # TRL's bf16 adapters on a quantized model (Setup.adapter_bytes): peft's
        # ``_cast_input_dtype`` copies an fp32 (k-bit prepared) input to bf16 per adapter
        # (peft 0.21.2 tuners/lora/bnb.py Linear4bit.forward); a bf16 input goes in as it is
        if setup.precision.compute_dtype_name != "bfloat16":
            return {"lora_adapters": sum(HALF * (lin.in_features + r) for lin in targets)}
        inputs = {}
        for lin in targets:
            key = (lin.group, "in") if shares_block_input(spec, lin) else (lin.group, lin.name)
            if shares_block_input(spec, lin) or not _input_already_saved(spec, setup, lin):
                inputs[key] = lin.in_features
        return {"lora_adapters": HALF * (sum(inputs.values()) + r * len(targets))}
    if setup.precision.compute_bytes == FP32 and setup.trains_layer_weights:
        # layer units: every base linear saves its input for its weight's gradient (the same tensor)
        return {"lora_adapters": FP32 * r * len(targets)}
    if setup.precision.compute_bytes == FP32:
        inputs = {}
        for lin in targets:
            if shares_block_input(spec, lin):
                inputs[(lin.group, "in")] = lin.in_features
            elif not _input_already_saved(spec, setup, lin):
                inputs[(lin.group, lin.name)] = lin.in_features
        return {"lora_adapters": FP32 * (sum(inputs.values()) + r * len(targets))}
    return {"lora_adapters": sum(FP32 * (lin.in_features + r) for lin in targets)}


def _int8_inputs(spec: ModelSpec, setup: Setup, first_block: bool = False) -> int:
    """Per token, the inputs bitsandbytes' 8-bit linears save beyond what the model saves
    anyway: each keeps its input for the input's gradient once that needs one (bitsandbytes
    0.50.2 autograd/_functions.py:187-189 ``ctx.tensors = (CAt, subA, A)``, MatMul8bitLt on
    CUDA; :269 ``ctx.A = A``, MatMul8bitFp on CPU), unlike a frozen nn.Linear, which keeps only
    its weight. A block's input projections read one tensor (saved once); an fp32 adapter reads
    the same tensor (no copy, :func:`_lora_terms` counts it), a 16-bit one an fp32 copy of it.
    ``first_block``: the first block's input projections only (their input needs no gradient
    in the first layer without checkpointing: nothing saved there)."""
    p = setup.precision.compute_bytes
    targets = {id(lin) for lin in lora_targets(spec, setup.lora_targets)}
    adapters_share = p == FP32  # an fp32 adapter saves the very input tensor
    linears = layer_linears(spec)
    out = 0
    for group in dict.fromkeys(lin.group for lin in linears):
        members = [lin for lin in linears if lin.group == group and not lin.fused_experts and not lin.router]
        if not members:
            continue
        inputs, output = members[:-1], members[-1]
        if inputs and not (adapters_share and any(id(lin) in targets for lin in inputs)):
            out += p * inputs[0].in_features
        if first_block:
            return out
        if not _input_already_saved(spec, setup, output) and not (adapters_share and id(output) in targets):
            out += p * output.in_features
    return out


def checkpointed_activations(spec: ModelSpec, setup: Setup) -> Activations:
    """Gradient checkpointing per decoder layer (transformers ``gradient_checkpointing_enable``):
    each layer keeps its input; one layer's full set is rebuilt during its backward.
    Korthikanti et al. 2022 Sec. 5: full recomputation keeps 2sbh per layer (2-byte)."""
    _, resid, _ = _dtypes(setup)
    T = setup.batch * setup.seq
    full = training_activations(spec, setup)
    # a masked layer (sliding window) recomputes its converted mask too: the largest layer is it
    masked = masked_layer_bytes(spec, setup) * T if "masked_layers" in full.outside else 0
    # a recomputed layer parametrizes its LoRA expert stacks again (lora_expert_weights)
    masked += lora_expert_weights(spec, setup)
    if spec.num_experts:  # and holds its MoE experts' locals where its recomputation stops
        masked += arch_of(spec).recomputed_quirk(spec, setup, recomputed_moe_locals(spec, setup)) * T
    outside = {k: v for k, v in full.outside.items()
               if k not in ("first_layer_frozen", "masked_layers", "lora_expert_weights", "dense_layers",
                         "frozen_prefix", "other_layers")}
    if setup.attn is Attention.EAGER:
        # the checkpoint keeps each layer's arguments for its recomputation (torch/utils/checkpoint.py
        # non-reentrant: the recompute closure holds ``args``), the additive (b, 1, s, s) eager mask
        # among them, in the stream's dtype (transformers 5.24 masking_utils.py ``eager_mask``:
        # min_dtype where masked), alive from the forward to the first layer's backward; one per
        # mask kind when full and sliding-window layers mix (``causal_mask_mapping``). Measured on
        # the sim: SmolLM2-360M-L2 QLoRA (fp32 stream) eager at s4096, 64 MiB at the backward peak
        outside["eager_mask"] = eager_masks(spec, setup) * resid * setup.seq * T
    return Activations(per_layer={"layer_input": resid * spec.hidden_size * T},
                       layers=spec.num_layers,
                       outside={**outside, "recomputed_layer": full.layer_bytes + masked})


def recomputed_moe_locals(spec: ModelSpec, setup: Setup) -> int:
    """Per token, what a checkpointed MoE layer's recomputation holds beyond the tensors it saves,
    where its routed grouped_mm experts end the layer (Mixtral, Qwen3-MoE, GraniteMoe, gpt-oss).

    torch's non-reentrant checkpoint (transformers 5.24 modeling_utils.py:3158 ``use_reentrant``
    False) stops the recomputation at the last tensor the layer saved (torch/utils/checkpoint.py:1128-1131
    ``early_stop``, True by default: :1564; :1184 drops the exception), so the forward's locals of that
    moment live beside every recomputed saved tensor. Here that tensor is the ``inv_perm`` index of
    ``weighted_out[inv_perm]`` (integrations/moe.py:529; what follows, the view's sum, the cast and the
    decoder layer's residual add, saves nothing), and the locals then are the routing-weight product
    ``weighted_out`` (S, h, :524: fp32 where the routing weights are, Arch.routing_weights_fp32), never
    saved (the index keeps only its indices), the gathered inputs ``selected_hidden_states_g`` (S, h,
    :441) where no trainable expert saves them, and in the decoder layer the MoE's input (the post-attention
    norm's output, saved only by a trainable router's linear, so in full training) and the residual
    sum beside it (its norm saves an fp32 copy of it; the very tensor in fp32), e.g.
    modeling_granitemoe.py:360-362, modeling_qwen3_moe.py:346-348. Measured on the sim, GraniteMoe
    reduced (4 layers, 40 experts top-8, b2 x s1024 bf16) LoRA on q/k/v/o with checkpointing: the
    last layer's recomputation, 108 MiB of these beside its saved tensors (the backward -11.0 % without
    them, -2.3 % with: the rest is the view's (S, h) gradient copy the index's backward reads, made before
    the recomputation, which the generic layer working set stands in for); Qwen3-MoE reduced (2 layers,
    vocabulary 8,000) LoRA on q/k/v/o -5.5 % -> -0.8 %, Mixtral's -1.4 % -> +0.5 %. A family whose
    layer ends otherwise says so (Arch.recomputed_quirk)."""
    p, resid, _ = _dtypes(setup)
    h, k = spec.hidden_size, spec.experts_per_token
    if setup.mode in (Mode.LORA, Mode.QLORA) and not setup.trains_layer_weights:
        experts_trainable = any(lin.fused_experts for lin in lora_targets(spec, setup.lora_targets))
    else:
        experts_trainable = setup.trains_layer_weights
    weighted = k * h * (FP32 if arch_of(spec).routing_weights_fp32 else p)
    gathered = 0 if experts_trainable else k * h * p
    moe_input = 0 if setup.trains_layer_weights else p * h
    residual = resid * h if resid != FP32 else 0
    return weighted + gathered + moe_input + residual


def eager_masks(spec: ModelSpec, setup: Setup) -> int:
    """How many (b, 1, s, s) additive masks an eager forward builds: one, or two where
    sliding-window and full-attention layers mix (``create_causal_mask`` and
    ``create_sliding_window_causal_mask``)."""
    sliding = traits(spec, setup).sliding_layers
    return 2 if 0 < sliding < spec.num_layers else 1


def sink_attention_left(spec: ModelSpec, act) -> int:
    """Of a layer's saved bytes, what its eager sink attention's softmax backward still finds:
    the input norm's, the normed input (or the adapters' copies of it), q and the repeated k,
    and the max's indices (measured on the sim and on real CPU steps, gpt-oss)."""
    per = act.per_layer
    return per.get("norms", 0) // spec.norms_per_layer + per.get("linear_inputs", 0) // 2 \
        + per.get("attn_qkv", 0) * 2 // 3 + per.get("attn_sink_max", 0) + per.get("lora_adapters", 0)


def sink_attention_working(spec: ModelSpec, setup: Setup) -> int:
    """The buffers of an eager sink attention's backward (modeling_gpt_oss.py:239-253): the value
    matmul's gradient of the probabilities' view, the probabilities' (heads, s, s + 1) gradient
    the slice's backward makes and the softmax's backward output, beside the residual stream's
    and the attention output's gradients (T, h) and (T, heads x d)."""
    T, p, a, s = setup.batch * setup.seq, setup.precision.compute_bytes, spec.num_heads, setup.seq
    return 3 * p * a * (s + 1) * T + p * (spec.hidden_size + spec.q_dim) * T
