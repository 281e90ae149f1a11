"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention (MLA) in every layer, a
dense SwiGLU MLP in the first ``first_k_dense_replace`` layers and in the rest a sparse MoE
block: a sigmoid router with grouped top-k and a score-correction bias, fused routed experts
and an always-on shared-expert MLP.

Sources (transformers 5.24, models/deepseek_v3/):

- configuration_deepseek_v3.py:81-116 the fields and defaults (``n_routed_experts`` is read as
  ``num_local_experts``: :76-79 attribute_map; ``q_lora_rank`` may be None; ``v_head_dim``,
  ``qk_nope_head_dim``, ``qk_rope_head_dim``; ``tie_word_embeddings`` False; ``attention_bias``
  False); :122-123 ``qk_head_dim = qk_nope_head_dim + qk_rope_head_dim``, ``head_dim =
  qk_rope_head_dim`` (what the rotary tables span).
- modeling_deepseek_v3.py:38-52 DeepseekV3RMSNorm (Llama's form: ``weight * x.to(dtype)``).
- :104-117 DeepseekV3MLP: gate_proj, up_proj (h -> f), down_proj (f -> h), no bias; the dense
  layers' f is ``intermediate_size``, the shared experts' ``moe_intermediate_size *
  n_shared_experts`` (:211-213).
- :120-158 DeepseekV3TopkRouter: a weight (E, h) of its own (not nn.Linear), kept in fp32
  (:551 ``_keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]``), and the
  ``e_score_correction_bias`` (E,) an fp32 buffer, no parameter (:131); the fp32 logits
  ``F.linear(hidden.float(), weight.float())``, ``sigmoid``, the bias added for the choice only,
  groups of E / n_group scored by their top-2 sum, ``topk_group`` groups kept, ``masked_fill``
  -inf elsewhere, top-k indices, the weights gathered from the sigmoid scores, normalised
  (``norm_topk_prob``) and scaled by ``routed_scaling_factor`` (the "noaux_tc" method).
- :161-198 DeepseekV3Experts (``@use_experts_implementation``): ``gate_up_proj`` (E, 2f, h),
  ``down_proj`` (E, h, f), f = ``moe_intermediate_size``; transformers 5 runs the grouped_mm
  forward by default (modeling_utils.py ``get_correct_experts_implementation``; integrations/
  moe.py ``grouped_mm_experts_forward``), as for gpt_oss and qwen3_moe.
- :201-222 DeepseekV3MoE: ``experts(x, topk_indices, topk_weights) + shared_experts(x)``.
- :349-405 DeepseekV3Attention: ``q_proj`` (h -> heads x qk_head_dim) when ``q_lora_rank`` is
  None, else ``q_a_proj`` (h -> q_lora_rank, biased with ``attention_bias``), ``q_a_layernorm``
  (q_lora_rank) and ``q_b_proj`` (q_lora_rank -> heads x qk_head_dim); ``kv_a_proj_with_mqa``
  (h -> kv_lora_rank + qk_rope_head_dim, ``attention_bias``), ``kv_a_layernorm`` (kv_lora_rank),
  ``kv_b_proj`` (kv_lora_rank -> heads x (qk_nope_head_dim + v_head_dim)); ``o_proj`` (heads x
  v_head_dim -> h, ``attention_bias``).
- :427-483 the forward: q split into nope/rope parts, the latent split into ``kv_nope``
  (kv_lora_rank, normed) and the single-head ``k_rot``; rotary on q_rot and k_rot; the cache
  updated with the two compressed latents (:459-460, see below); ``torch.cat((q_pass, q_rot))``
  (:462); ``expand_kv`` (:407-425) runs kv_b_proj on the (cached) latent, splits k_nope / value and copies
  k_nope and the broadcast k_rot into a new key tensor; attention gets q and k of qk_head_dim and
  v of v_head_dim per head.
- :493-496 a layer is MoE when ``layer_idx >= first_k_dense_replace`` (``moe_layer_freq`` of the
  published config is not read by transformers 5.24).

The KV cache: DynamicCache (:599) holds, per layer, the normed latent ``kv_nope`` (b, 1, s,
kv_lora_rank) and the rotated ``k_rot`` (b, 1, s, qk_rope_head_dim) in the compute dtype
(:444-460), not per-head keys and values: (kv_lora_rank + qk_rope_head_dim) per token and layer
(576 for DeepSeek-V3, against 2 x 128 x 56 = 14,336 in the Llama fallback's formula), and every
attention call re-expands the whole cached latent through kv_b_proj.

The memory terms (:meth:`DeepseekV3.saved_quirk`): MLA's latent norms, q and k of qk_head_dim made
by the concatenations, v a view of kv_b_proj's whole output, the mem-efficient kernel CUDA sdpa takes for
unequal head sizes; the fp32 router, the grouped_mm experts, the shared expert; the dense layers apart
(``activations.py`` ``dense_layers``). :meth:`DeepseekV3.memory_gap` lets through only the setups checked
against the CUDA sim within 1 % (full training; LoRA on the MLA projections) and refuses the rest in one
sentence; the profiler measures those without an estimate. Exact besides: the config's reading, the
parameter inventory (counts, groups, per-tensor sizes; equal to the meta build) and what peft 0.21
wraps (``peft_moe_names``).
"""
from __future__ import annotations

from ..configcheck import MAX_HEAD_DIM, MAX_HIDDEN
from ..setup import Device, Mode
from ..units import FP32
from .base import Linear, Norm, Tensor, read_common_llama
from .grouped_moe import (
    MOE_FIELDS,
    GroupedTopkMoE,
    checked_on_the_cuda_sim,
    checked_with_checkpointing,
    unchecked_sentence,
)
from .llama import LlamaStyle

#: DeepseekV3Config's defaults (configuration_deepseek_v3.py:81-116)
_DEFAULTS = dict(moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256, kv_lora_rank=512,
                 q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                 topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3)
#: the (name, value) pairs kept in ModelSpec.family_fields
_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim") + MOE_FIELDS


class DeepseekV3(GroupedTopkMoE, LlamaStyle):
    model_types = ("deepseek_v3",)
    family = "deepseek_v3"
    norm = Norm.RMS
    switches = ()  # only transformers 5.24's layout is read (the latent cache, fused experts)
    # transformers conversion_mapping.py:56 maps deepseek_v3 onto qwen2_moe, whose names peft 0.21
    # turns into target parameters (transformers_weight_conversion.py:339-344); peft has no default
    # target_modules for deepseek_v3 (peft/utils/constants.py: absent; "No `target_modules` passed")
    peft_targets = ()
    # the published checkpoints' fp8 (e4m3, 128 x 128 blocks) quantization_config: from_config builds
    # no quantizer (the profiler drops the key: profiler/measure/build.py hf_config) and the router's
    # weight stays fp32 whatever the dtype (modeling_deepseek_v3.py:551)
    checkpoint_detail = "an fp8 checkpoint is built unquantized from its config; the router's weight stays fp32"
    # DeepseekV3MoE (:209-213), DeepseekV3TopkRouter (:138-143) as the config errors cite them
    moe_source = ("modeling_deepseek_v3.py:138-143, :209-213", "DeepseekV3")

    def read(self, f, model_type):
        out = read_common_llama(f)  # hidden, layers, heads, kv heads, intermediate_size (the dense MLP's), vocab
        ints = {k: f.int(k, limit=MAX_HEAD_DIM, default=_DEFAULTS[k])
                for k in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")}
        ints["kv_lora_rank"] = f.int("kv_lora_rank", limit=MAX_HIDDEN, default=_DEFAULTS["kv_lora_rank"])
        # q_lora_rank null: one q_proj (modeling_deepseek_v3.py:370-374); absent: the default 1536
        ints["q_lora_rank"] = 0 if "q_lora_rank" in f.config and f.config["q_lora_rank"] is None \
            else f.int("q_lora_rank", limit=MAX_HIDDEN, default=_DEFAULTS["q_lora_rank"])
        moe, moe_ints = self.read_moe(f, out, _DEFAULTS)
        ints.update(moe_ints)
        qk_head_dim = ints["qk_nope_head_dim"] + ints["qk_rope_head_dim"]
        return dict(out, **moe, head_dim=qk_head_dim, family_fields=tuple((k, ints[k]) for k in _FIELDS))

    # --- the inventory ------------------------------------------------------------------

    def _attention(self, spec) -> list[Linear]:
        m = _fields(spec)
        h, a, bias = spec.hidden_size, spec.num_heads, spec.qkv_bias
        qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
        if m["q_lora_rank"]:
            q = [Linear("q_a_proj", "attention", h, m["q_lora_rank"], bias),
                 Linear("q_b_proj", "attention", m["q_lora_rank"], a * qk, False)]
        else:
            q = [Linear("q_proj", "attention", h, a * qk, False)]
        return q + [Linear("kv_a_proj_with_mqa", "attention", h, m["kv_lora_rank"] + m["qk_rope_head_dim"], bias),
                    Linear("kv_b_proj", "attention", m["kv_lora_rank"],
                           a * (m["qk_nope_head_dim"] + m["v_head_dim"]), False),
                    Linear("o_proj", "attention", a * m["v_head_dim"], h, spec.o_bias)]

    def linears(self, spec):
        """An MoE layer's matrices: MLA, the routed experts, the router, the shared experts."""
        return self._attention(spec) + self.moe_linears(spec)

    def dense_linears(self, spec):
        return self._attention(spec) + self.dense_mlp_linears(spec)

    def layer_norms(self, spec):
        """input_layernorm, post_attention_layernorm (h each), q_a_layernorm (where q has a
        latent) and kv_a_layernorm (modeling_deepseek_v3.py:380, :392, :498-499)."""
        m = _fields(spec)
        latent = [Tensor("q_a_layernorm.weight", "norms", m["q_lora_rank"], 1)] if m["q_lora_rank"] else []
        return super().layer_norms(spec) + latent + [Tensor("kv_a_layernorm.weight", "norms", m["kv_lora_rank"], 1)]

    # --- the memory terms ---------------------------------------------------------------

    def saved_quirk(self, spec, setup, terms):
        """What one layer saves per token in training, from modeling_deepseek_v3.py (5.24), on the
        CUDA semantics with sdpa (what :meth:`memory_gap_for` lets through):

        MLA (:427-483): the input norm and the normed input (one tensor read by q_a_proj and
        kv_a_proj_with_mqa) are the generic ``norms`` / ``linear_inputs``; each latent norm
        (q_a_layernorm on q_lora_rank, kv_a_layernorm on kv_lora_rank; DeepseekV3RMSNorm :47-52)
        saves its fp32 upcast, an fp32 rsqrt and, with its weight trainable, ``x.to(dtype)``; q_b_proj
        and kv_b_proj save their inputs (the latent norms' outputs) when trainable. The rotary
        multiplications save only cos and sin (shared); ``torch.cat((q_pass, q_rot))`` (:462) and
        ``expand_kv``'s ``new_empty`` + ``copy_`` (:418-423) make q and k of heads x qk_head_dim, new
        tensors that sdpa saves; v is a ``torch.split`` view of kv_b_proj's output (:417), so sdpa
        keeps that whole (heads x (qk_nope + v)) output. q/k 192 and v 128 differ, so CUDA sdpa
        takes the mem-efficient kernel (sdp_utils.cpp: flash and cuDNN need equal head sizes;
        profiler/measure/sim.py sdpa_backend), which saves q, k, v, its (b, s, heads, v) output (what
        o_proj reads: no copy) and a logsumexp padded to 32 queries.

        MoE (:120-158, :201-222; integrations/moe.py:424-537): the router's ``hidden.type(fp32)``
        copy (saved by F.linear for its fp32 weight's gradient), the sigmoid's fp32 scores (E), the
        group top-2's int64 indices (n_group x 2), the group top-k's (topk_group), the ``masked_fill``
        bool mask (E), the top-k's indices (k, also gather's index), the normalising sum (1) and the
        in-place division's operands (k fp32 twice); grouped_mm's ``perm // k``, ``perm`` and
        ``inv_perm`` (int64, S = T x k), the gathered routing weights (fp32, S) and the down output
        (S, h) the weighting saves, the gathered inputs (S, h) for trainable experts, the gate_up
        output (2f: silu's input and up are views of it), silu's output and the product for
        trainable experts; the shared-expert MLP (f x n_shared): its input when trainable (the
        normed input again, one tensor), gate_up outputs, silu and the product. The dense layers'
        DeepseekV3MLP (:104-117, intermediate_size) instead of all that (grouped_moe.py
        :meth:`GroupedTopkMoE.moe_saved`, which GLM-4.5 shares)."""
        m = _fields(spec)
        p, a = setup.precision.compute_bytes, spec.num_heads
        full = setup.mode is Mode.FULL
        qk, dv, rq, rk = spec.head_dim, m["v_head_dim"], m["q_lora_rank"], m["kv_lora_rank"]
        out = self.moe_base(spec, setup, terms, strip=("attn_", "o_proj"))

        def latent_norm(dim):  # DeepseekV3RMSNorm on a latent (:47-52), then the linear reading it
            return FP32 * dim + FP32 + (2 * p * dim if full else 0)

        out["attn_latents"] = (latent_norm(rq) if rq else 0) + latent_norm(rk)
        s = setup.seq
        if setup.device is Device.CPU:
            # CPU sdpa takes the math kernel for unequal head sizes (tests/test_deepseek_v3.py; attention.cpp
            # _scaled_dot_product_attention_math): it saves the fp32 scaled q and scaled k, the fp32 v
            # (the upcasts copy, so kv_b_proj's output is not kept) and the fp32 probabilities; its
            # (b, heads, s, v) output reaches o_proj through ``reshape(...).contiguous()``, a copy a
            # trainable o_proj saves (kernels.attention_output_copied)
            out["attn_qkv"] = FP32 * a * (2 * qk + dv)
            out["attn_scores"] = FP32 * a * s
            if full:
                out["o_proj_input"] = p * a * dv
        else:
            lse = FP32 * a * -(-s // 32) * 32 // s  # mem-efficient pads its logsumexp to 32 queries
            out["attn_qkv"] = p * a * (2 * qk + m["qk_nope_head_dim"] + dv)
            out["attn_out"] = p * a * dv
            out["attn_lse"] = lse
        return self.moe_saved(spec, setup, out)

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """The no-grad prefill's layer working set (modeling_deepseek_v3.py, 5.24; CUDA sdpa).

        Attention at the mem-efficient kernel (:427-483), beside the generic residual stream: the
        locals ``q_states`` (q_b_proj's output, which ``q_pass`` views), the rotated ``q_rot``,
        ``compressed_kv``, the normed ``kv_nope``, the rotated ``k_rot``, ``query_states`` (the
        cat), kv_b_proj's output (``value_states`` views it), ``key_states`` and the kernel's output.

        An MoE layer (:201-222, integrations/moe.py:424-537), at ``weighted_out[inv_perm]``: the
        gathered inputs and the down output (S, h), the routing-weighted copy and its re-ordering,
        fp32 (S, h) each, since the routing weights are fp32 (the router computes in fp32: :134,
        :150-155, and ``proj_out * sample_weights_g`` promotes); the router's logits (kept in ``_``),
        its weights and indices, the sorted ids, ``perm``, ``inv_perm`` and the gathered weights;
        beside them the layer input (the model's loop variable), the residual sum and its norm
        (:meth:`GroupedTopkMoE.moe_prefill`)."""
        m = _fields(spec)
        T, p, a = setup.batch * setup.seq, setup.precision.compute_bytes, spec.num_heads
        qk, dr, dn, dv = spec.head_dim, m["qk_rope_head_dim"], m["qk_nope_head_dim"], m["v_head_dim"]
        rk = m["kv_lora_rank"]
        attn = p * (a * (2 * qk + dr + (dn + dv) + qk + dv) + (rk + dr) + rk + dr) * T
        if setup.device is Device.CPU:
            # the math kernel at its softmax (kernels.math_kernel_extra): the fp32 upcast q, the scaled q
            # and k, the fp32 v, the scores and the probabilities (b, heads, s, s) and the (s, s) causal
            # mask; not checked (the real CPU prefill measured ~2 % below this: refused)
            attn += FP32 * (a * (3 * qk + dv) + 2 * a * setup.seq) * T + FP32 * setup.seq * setup.seq
        return resid, self.moe_prefill(spec, setup), attn

    def decode_working(self, spec, setup, tokens):
        """A decode step's last attention layer, after its cache update (:459-465): ``expand_kv`` runs
        kv_b_proj on the whole cached latent, (b, tokens, heads x (qk_nope + v)), which the value
        views, and copies the key into (b, heads, tokens, qk_head_dim); beside them the new token's
        q_states, q_rot, query_states and the kernel's output."""
        m = _fields(spec)
        p, a, b = setup.precision.compute_bytes, spec.num_heads, setup.batch
        qk, dv = spec.head_dim, m["v_head_dim"]
        new = p * a * (2 * qk + m["qk_rope_head_dim"] + dv) * b
        # CPU: the math kernel's fp32 copies of the key and the value and its scaled key (attention.cpp
        # _scaled_dot_product_attention_math; measured on a real CPU decode step: 64.3 MiB here)
        math = FP32 * a * (2 * qk + dv) * b * tokens if setup.device is Device.CPU else 0
        return p * a * (m["qk_nope_head_dim"] + dv + qk) * b * tokens + new + math

    def kv_elems_per_token(self, spec):
        """The latent cache (:444-460): the normed ``kv_nope`` (kv_lora_rank) and the rotated
        ``k_rot`` (qk_rope_head_dim) per token and layer."""
        m = _fields(spec)
        return m["kv_lora_rank"] + m["qk_rope_head_dim"]

    # --- what is not modelled -----------------------------------------------------------

    def memory_gap(self, spec, setup):
        """The setups whose every phase was checked against the CUDA sim within 1 % (4 layers, 1 dense
        + 3 MoE, 16 experts top-4, 16 heads, b2 x s1024 bf16: tests/test_deepseek_v3.py): full
        training, LoRA on the MLA projections or all-linear, inference (prefill and decode), an eval
        forward without a cache; bf16,
        sdpa, one GPU; with checkpointing full training and LoRA on the MLA projections or all-linear
        (:func:`checked_with_checkpointing`; measured backward full -0.05 %, MLA -0.04 %, all-linear
        -0.42 %, the first or last MoE layer's routing-weight backward, as GLM-4.5's:
        GroupedTopkMoE.recomputed_experts_backward; -4.2 / -14.5 % for full / all-linear before it);
        the rest is refused in one sentence."""
        mla = {lin.name for lin in self._attention(spec)}
        if checked_on_the_cuda_sim(setup, mla) or checked_with_checkpointing(setup, mla):
            return ""
        return unchecked_sentence(spec, setup, "deepseek_v3", "multi-head latent attention and its MoE layers", mla,
                                  also=", and full training or those LoRA targets with checkpointing")


def _fields(spec) -> dict:
    return dict(spec.family_fields)


ARCHS = (DeepseekV3(),)
