"""gpt-oss (GptOssForCausalLM): a decoder of alternating sliding-window and full attention
layers with a learned attention sink per head, biased q/k/v/o projections, and a sparse MoE
block in every layer: a biased top-k router and fused, biased 3-D experts with a clamped SwiGLU.

Sources (transformers 5.24, models/gpt_oss/):

- modeling_gpt_oss.py:47-62 GptOssRMSNorm: ``(self.weight * x_fp32_normed).to(input_dtype)``
  (OLMo 2's form: the fp32 normed input is saved for the weight's gradient).
- :68-80 GptOssExperts, decorated ``use_experts_implementation(is_concatenated=False,
  is_transposed=True, has_bias=True)``: ``gate_up_proj`` (E, h, 2f) with ``gate_up_proj_bias``
  (E, 2f), ``down_proj`` (E, f, h) with ``down_proj_bias`` (E, h). transformers 5 runs them with
  the grouped_mm experts forward by default (modeling_utils.py:1893-1894
  ``get_correct_experts_implementation``: "grouped_mm" unless asked otherwise;
  integrations/moe.py:424-537 ``grouped_mm_experts_forward``: tokens sorted by expert, the
  gathered inputs, the gathered biases ``gate_up_proj_bias[expert_ids_g]`` added in place,
  ``self._apply_gate``, the down projection, ``proj_out * sample_weights_g``, ``[inv_perm]``); on
  CPU with torch > 2.10 the same native grouped_mm (moe.py:302-352 ``_can_use_grouped_mm``). The
  per-expert loop of :90-114 is the ``experts_implementation="eager"`` path, not modelled.
- :82-88 ``_apply_gate``: ``gate, up = gate_up[..., ::2], gate_up[..., 1::2]`` (interleaved
  views), ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``, ``glu = gate *
  sigmoid(gate * alpha)``, ``(up + 1) * glu`` (swiglu_limit 7.0, swiglu_alpha 1.702:
  configuration_gpt_oss.py:68-69). What that saves: traits ``MLP.CLAMPED_SWIGLU``.
- :117-130 GptOssTopKRouter: a (E, h) weight and (E,) bias of its own (not nn.Linear),
  ``F.linear`` logits in the compute dtype, ``topk`` of the logits, then ``softmax`` over the k
  values in their dtype (traits ``Router.TOPK_SOFTMAX``); the logits are returned but only kept
  with ``output_router_logits`` (:386 OutputRecorder; :641-650 the auxiliary loss), off by
  default (configuration_gpt_oss.py:71) and not modelled.
- :227-255 eager_attention_forward: ``repeat_kv``; scores ``matmul(q, k^T) * scaling + mask``;
  ``sinks`` (one logit per head, :285) expanded to (b, heads, s, 1) and ``torch.cat`` to the
  scores; ``combined - combined.max(-1, keepdim=True).values``; ``softmax(dtype=combined.dtype)``
  (no fp32 upcast); the sink column dropped by a view; ``matmul(probs, v)``. traits ``attn_sinks``.
- :272-285 q/k/v/o projections with ``attention_bias`` (True by default,
  configuration_gpt_oss.py:77), ``sinks`` (heads,) Parameter.
- :284 sliding layers get ``config.sliding_window`` (128, configuration_gpt_oss.py:59); :84-87
  the default ``layer_types``: even layers sliding, odd full.
- :373-381 ``_supports_sdpa = False`` (transformers raises for ``attn_implementation="sdpa"``:
  modeling_utils.py:1665-1670), ``_supports_flash_attn`` with ``_compatible_flash_implementations``
  hub kernels (:391-396) that flash_attention_2 is rewritten to (modeling_utils.py:1752-1771):
  eager attention only here (:meth:`GptOss.refuse`).
- :149-192 the rotary embedding (yarn: configuration_gpt_oss.py:89-97, factor 32 over 4096
  original positions; ``max_position_embeddings`` 131072 is the stretched length).

MXFP4: the published checkpoints carry ``quantization_config`` ``{"quant_method": "mxfp4"}``
for the experts. Training needs them dequantized (transformers quantizers/quantizer_mxfp4.py:
208-213 ``is_trainable`` is False: "dequantizing the model first by passing
quantization_config=Mxfp4Config(dequantize=True)"), and inference on CPU or without the hub
kernels dequantizes to bf16 too (:172-184). So the estimate counts every parameter in the
setup's precision, says so in a note (base.py ``Arch.checkpoint_note``), and never
loads the MXFP4 kernels: ``from_config`` builds no quantizer and the profiler drops the key
(profiler/measure/build.py ``hf_config``). MXFP4 inference with the kernels (experts at ~4.25
bits) is not modelled: there the estimate over-counts the experts' weights.
"""
from __future__ import annotations

from ..configcheck import MAX_EXPERTS, MAX_HEAD_DIM, ConfigError, check_shapes
from .base import MLP, Norm, Router, Softmax, Tensor, fused_expert_linears, read_common_llama
from .llama import LlamaStyle

#: GptOssConfig's defaults (configuration_gpt_oss.py:51-77)
_DEFAULT_EXPERTS, _DEFAULT_TOP_K, _DEFAULT_HEAD_DIM, _DEFAULT_WINDOW = 128, 4, 64, 128


class GptOss(LlamaStyle):
    model_types = ("gpt_oss",)
    family = "gpt_oss"
    norm = Norm.RMS_WEIGHT_FP32
    eager_softmax = Softmax.COMPUTE  # softmax(dtype=combined_logits.dtype), modeling_gpt_oss.py:250
    switches = ()  # gpt_oss exists from transformers 4.55; only 5.x's layout is modelled
    # peft 0.21: gpt_oss is not in transformers' conversion mapping (conversion_mapping.py:48-67), so
    # no target_modules name reaches the experts or the router: "all-linear" wraps q/k/v/o_proj only
    # and gate_proj/up_proj/down_proj are "not found" (checked on peft 0.21.2)
    peft_maps_experts = False

    def read(self, f, model_type):
        out = read_common_llama(f)
        experts = f.int("num_local_experts", "num_experts", limit=MAX_EXPERTS, default=_DEFAULT_EXPERTS)
        per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=_DEFAULT_TOP_K)
        check_shapes(f.where, out["hidden_size"], out["num_heads"], out["num_kv_heads"], head_dim_given=True,
                     experts=experts, experts_per_token=per_token)
        if f.config.get("head_dim") is None:  # GptOssConfig: 64, not hidden_size // heads
            out["head_dim"] = f.int("head_dim", limit=MAX_HEAD_DIM, default=_DEFAULT_HEAD_DIM)
        bias = f.bool("attention_bias", True)
        if f.bool("output_router_logits", False):
            raise ConfigError(f"{f.where}: output_router_logits (the router logits of every layer kept for the "
                              f"auxiliary loss) is not modelled; set it false or measure it with "
                              f"`vramlab profile ... --backend sim`")
        qc = f.config.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise ConfigError(f"{f.where}: quantization_config must be an object, got {type(qc).__name__}")
        f.number("swiglu_limit")
        f.number("swiglu_alpha")
        return dict(out, num_experts=experts, experts_per_token=per_token, qkv_bias=bias, o_bias=bias,
                    mlp_bias=True, gated_mlp=True)

    def linears(self, spec):
        # GptOssTopKRouter (modeling_gpt_oss.py:123-124): weight (E, h), bias (E,); GptOssExperts
        # (:75-78): gate_up_proj (E, h, 2f) + bias (E, 2f), down_proj (E, f, h) + bias (E, h)
        return fused_expert_linears(spec, biased=True)

    def layer_norms(self, spec):
        # input_layernorm, post_attention_layernorm (:337-338), and the attention's sinks (heads,) (:285)
        return super().layer_norms(spec) + [Tensor("sinks", "attention", spec.num_heads, 1)]

    def mlp_kind(self, spec):
        return MLP.CLAMPED_SWIGLU

    def base_traits(self, spec):
        return {"attn_sinks": True, "router": Router.TOPK_SOFTMAX, "cache_keeps_window": True}

    def sliding_window(self, spec):
        window = spec.config.get("sliding_window", _DEFAULT_WINDOW)
        return window if isinstance(window, int) and not isinstance(window, bool) else 0

    def layer_types(self, spec):
        types = spec.config.get("layer_types")
        if isinstance(types, list):
            return list(types)
        # configuration_gpt_oss.py:84-87: sliding when (i + 1) is odd
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(spec.num_layers)]

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """The no-grad prefill's layer working set, from the forward's locals.

        Eager attention with sinks (modeling_gpt_oss.py:237-253): while the softmax runs, the
        masked scores (``attn_weights``, s columns, referenced until :252 rebinds it), the
        max-subtracted logits (s + 1, referenced until the function returns) and the
        probabilities (s + 1), beside q and repeat_kv's copies of k and v (a heads each); the
        two (b, 1, s, s) additive masks, full and sliding, live through the model's forward
        (:467-470). The grouped_mm experts over S = T x top-k rows (integrations/moe.py:440-537):
        while ``_apply_gate`` ends, the gathered inputs (S, h), the gathered gate_up biases (S, 2f,
        a local until :508 rebinds it), the gate_up output (S, 2f) and the clamped gate, clamped
        up, glu, up + 1 and the product (S, f each); later the gathered inputs, the down output, its
        gathered biases, the weighted copy and its re-ordering (S, h each). Beside the experts: the
        masks, the probabilities (the decoder layer keeps attention's returned weights, a view of
        them, in ``_`` until it returns: :354) and the layer input (the model's loop variable,
        :476) next to the residual sum and its norm (measured on the sim: 4 layers, 16 heads,
        b2 x s1024, -14.8 % without them)."""
        T, p, a, s = setup.batch * setup.seq, setup.precision.compute_bytes, spec.num_heads, setup.seq
        h, f, k = spec.hidden_size, spec.intermediate_size, spec.experts_per_token
        mlp = p * k * T * max(h + 9 * f, 5 * h) + p * a * (s + 1) * T + 2 * p * s * T + p * h * T
        attn = p * a * (3 * s + 2) * T + 3 * p * spec.q_dim * T + 2 * p * s * T
        return resid, mlp, attn

    def refuse(self, spec, setup):
        if not setup.semantics.at_least("transformers", "5.0"):
            # gpt_oss arrived in 4.55 with fused experts already (not nn.Linear, so no quantized
            # experts under QLoRA as Semantics.moe_experts_fused says of 4.x) and another experts
            # forward; only 5.x's is read here
            return (f"{spec.name} (gpt_oss) is modelled as transformers 5 runs it; transformers 4.x's gpt_oss "
                    f"(from 4.55, another experts forward) is not: drop --versions transformers=4.x")
        if setup.attn.value != "eager":
            return (f"{spec.name} (gpt_oss) runs eager attention only here: transformers 5.24 raises for sdpa "
                    f"(GptOssPreTrainedModel._supports_sdpa = False, modeling_gpt_oss.py:380) and swaps "
                    f"flash_attention_2 for a hub kernel (vllm-flash-attn3, :391-396) that vramlab never fetches; "
                    f"pass --attn eager")
        return ""


ARCHS = (GptOss(),)
