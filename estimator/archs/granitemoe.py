"""Granite MoE (GraniteMoeForCausalLM): Granite's multipliers on a Mixtral-style decoder whose
MLP is a sparse MoE block in every layer: a top-k router of its own class and fused 3-D experts.

Sources (transformers 5.24, models/granitemoe/):

- configuration_granitemoe.py:58-83 the fields and defaults (``tie_word_embeddings`` False,
  ``attention_bias`` False, ``num_local_experts`` 8, ``num_experts_per_tok`` 2, the multipliers
  1.0, ``output_router_logits`` False); :87-88 ``num_key_value_heads`` None -> heads.
- modeling_granitemoe.py:113-132 GraniteMoeTopKRouter: a (E, h) ``weight`` of its own (not
  nn.Linear, no fp32 keep), ``F.linear(...).float()`` logits, ``topk`` of them, ``softmax`` over the
  k fp32 values, ``.type_as(hidden_states)`` (traits ``Router.TOPK_SOFTMAX_FP32``); the logits are
  returned but only recorded with ``output_router_logits`` (:379 OutputRecorder, :627-633), refused.
- :135-172 GraniteMoeExperts, ``@use_experts_implementation`` with its defaults: ``gate_up_proj``
  (E, 2f, h) and ``down_proj`` (E, h, f), run by transformers 5's grouped_mm forward by default
  (integrations/moe.py, as Mixtral's and Qwen3-MoE's); the per-expert loop of :154-172 is the
  ``experts_implementation="eager"`` path, not modelled. The checkpoints' ``input_linear`` /
  ``output_linear`` / ``router.layer`` are renamed on load (conversion_mapping.py:915-927).
- :175-189 GraniteMoeMoE (``router``, ``experts``), :331-364 the decoder layer: ``residual +
  hidden_states * residual_multiplier`` (:359, :363; a product by a Python float, nothing saved);
  :272 ``scaling = attention_multiplier``; :447 ``inputs_embeds * embedding_multiplier``; :614
  ``logits = logits / logits_scaling`` (rebinding: the unscaled logits are freed), as Granite's.
- peft 0.21: granitemoe is not in transformers' ``_MODEL_TO_CONVERSION_PATTERN``
  (conversion_mapping.py:48-117 lists granitemoeshared / granitemoehybrid -> granitemoe, not
  granitemoe itself), so peft's MoE target conversion (peft/utils/transformers_weight_conversion.py:
  412-420) does nothing: ``all-linear`` wraps q/k/v/o_proj only, and no target_modules name reaches
  the experts or the router; no default targets (peft/utils/constants.py: absent).

:meth:`GraniteMoe.memory_gap` lets through only what was checked against the CUDA sim and real CPU
steps within 1 % (tests/test_granitemoe.py): with checkpointing, full training only.
"""
from __future__ import annotations

from ..configcheck import MAX_EXPERTS, ConfigError, check_shapes
from ..setup import Device, Mode
from ..units import FP32
from .base import Router, fused_expert_linears, read_common_llama
from .grouped_moe import INT64, checked_on_the_cuda_sim, unchecked_sentence
from .llama import LlamaStyle

#: GraniteMoeConfig's defaults (configuration_granitemoe.py:80-81)
_DEFAULT_EXPERTS, _DEFAULT_TOP_K = 8, 2


class GraniteMoe(LlamaStyle):
    model_types = ("granitemoe",)
    family = "granitemoe"
    switches = ()  # only transformers 5.24's layout is read (fused experts, the router module)
    peft_targets = ()  # peft/utils/constants.py: no default target_modules for granitemoe
    peft_maps_experts = False  # not in the conversion mapping peft reads (module docstring)

    def read(self, f, model_type):
        out = read_common_llama(f)
        experts = f.int("num_local_experts", limit=MAX_EXPERTS, default=_DEFAULT_EXPERTS)
        per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=_DEFAULT_TOP_K)
        check_shapes(f.where, out["hidden_size"], out["num_heads"], out["num_kv_heads"], head_dim_given=True,
                     experts=experts, experts_per_token=per_token)
        if not experts:
            raise ConfigError(f"{f.where}: num_local_experts must be at least 1 (GraniteMoeMoE builds its experts, "
                              f"modeling_granitemoe.py:139-145)")
        if f.bool("output_router_logits", False):
            raise ConfigError(f"{f.where}: output_router_logits (the router logits of every layer kept for the "
                              f"auxiliary loss, modeling_granitemoe.py:627-635) is not modelled; set it false or "
                              f"measure it with `vramlab profile ... --backend sim`")
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                    "router_aux_loss_coef"):
            f.number(key)  # checked as numbers; no memory term reads them
        return dict(out, num_experts=experts, experts_per_token=per_token, gated_mlp=True)

    def linears(self, spec):
        """q/k/v/o_proj (``attention_bias`` on all four, modeling_granitemoe.py:276-287), the router's
        (E, h) weight (:126) and the experts' gate_up_proj (E, 2f, h), down_proj (E, h, f) (:144-145),
        none of them biased."""
        return fused_expert_linears(spec, biased=False)

    def base_traits(self, spec):
        return {"router": Router.TOPK_SOFTMAX_FP32}

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """The no-grad prefill's MoE working set at its peak, ``weighted_out[inv_perm]``
        (integrations/moe.py:529; found on the CUDA sim): the generic grouped_mm experts' four (S, h)
        tensors (S = T x top-k) and beside them the layer input (the model's loop variable,
        modeling_granitemoe.py:453-454, next to the residual sum and its norm the generic stream
        counts), the router's fp32 logits (T, E), kept in ``_`` until GraniteMoeMoE.forward returns
        (:187), its (T, k) indices and compute-dtype weights (:130-131), the sorted expert ids,
        ``perm`` and ``inv_perm`` (int64, S each) and the gathered weights (S, compute dtype)
        (moe.py:440-442, :527). As grouped_moe.moe_prefill, whose routing weights are fp32."""
        T, p, h = setup.batch * setup.seq, setup.precision.compute_bytes, spec.hidden_size
        S = spec.experts_per_token * T
        return resid, mlp + p * h * T + FP32 * spec.num_experts * T + (4 * INT64 + 2 * p) * S, attn

    def memory_gap(self, spec, setup):
        """The setups whose every phase was checked within 1 % (tests/test_granitemoe.py): against the
        CUDA sim, full training, LoRA on the attention projections or all-linear (the same adapters
        here), inference (prefill and decode) and an eval forward without a cache; against real CPU
        steps the same; full training with checkpointing too (the recomputed experts' locals,
        activations.recomputed_moe_locals; per phase only: the estimate's moment, the first layer's
        recomputation beside its backward working set, splits gradients, activations and temporaries
        otherwise than the sim's, the first layer's gate_up weight gradient). bf16, sdpa, one device;
        the rest is refused in one sentence (CUDA sim, the refusal lifted: LoRA's checkpointed backward
        -2.3 % on q/k/v/o, the view's (S, h) gradient copy made before the recomputation, which the
        generic layer working set stands in for; -11.0 % before the locals; eager attention's full
        backward -2.1 %; fp16 / fp32 do not run there: CPU grouped_mm is bf16 only)."""
        attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
        checked = setup.replace(grad_ckpt=False) if setup.grad_ckpt and setup.mode is Mode.FULL else setup
        if checked_on_the_cuda_sim(checked, attention) or checked_on_the_cuda_sim(checked, attention, Device.CPU):
            return ""
        return unchecked_sentence(spec, setup, "granitemoe", "its MoE layers", attention,
                                  also=", or the same on the CPU, and full training with checkpointing")


ARCHS = (GraniteMoe(),)
