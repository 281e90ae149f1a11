"""GLM-4.5 / GLM-4.5-Air (Glm4MoeForCausalLM): grouped-query attention with biased q/k/v
projections, optional per-head q/k RMSNorm and a partial rotary embedding, a dense SwiGLU MLP in
the first ``first_k_dense_replace`` layers and in the rest DeepSeek-V3's MoE block (a sigmoid
router with grouped top-k and a score-correction bias, fused routed experts, a shared expert:
:mod:`estimator.archs.grouped_moe`).

Sources (transformers 5.24, models/glm4_moe/):

- configuration_glm4_moe.py:90-119 the fields and defaults (vocab 151552, hidden 4096,
  intermediate_size 10944 (the dense MLP's), 46 layers, 96 heads, 8 key/value heads,
  ``tie_word_embeddings`` False, ``attention_bias`` False, ``moe_intermediate_size`` 1408, top-8,
  ``n_shared_experts`` 1, ``n_routed_experts`` 128, ``n_group`` 1, ``topk_group`` 1,
  ``first_k_dense_replace`` 1, ``use_qk_norm`` False); :85-88 attribute_map
  (``num_local_experts`` -> ``n_routed_experts``, ``num_mtp_layers`` -> ``num_nextn_predict_layers``);
  :121-123 ``partial_rotary_factor`` defaults to 0.5. No ``head_dim`` field: the modeling takes
  ``getattr(config, "head_dim", hidden_size // heads)`` (modeling_glm4_moe.py:181).
- modeling_glm4_moe.py:174-251 Glm4MoeAttention: q_proj, k_proj, v_proj (``attention_bias``),
  o_proj without bias (:197); with ``use_qk_norm`` ``q_norm``/``k_norm`` (head_dim) on the
  (b, s, heads, d) views before the transpose (:219-221), as Qwen3 (the generic ``qk_norm`` terms,
  QKNorm.HEAD); the rotary embedding spans ``int(head_dim * partial_rotary_factor)`` (:75-77) and
  ``apply_rotary_pos_emb`` (:138-171) rotates a slice and concatenates the rest back, so q and k
  leave it as new full-width tensors, contiguous in (b, heads, s, d) (traits ``rotary_concat``:
  the kernel's output is copied before o_proj); the multiplications save only cos and sin.
- :253-266 Glm4MoeMLP, :269-307 Glm4MoeTopkRouter, :331-368 Glm4MoeExperts
  (``@use_experts_implementation``: grouped_mm by default), :371-392 Glm4MoeMoE, :402-405 a layer is
  MoE when ``layer_idx >= first_k_dense_replace``: line for line DeepSeek-V3's
  (modeling_deepseek_v3.py:104-222); :460 ``_keep_in_fp32_modules_strict`` keeps the router's weight
  fp32.
- The published configs' ``num_nextn_predict_layers`` (1): the multi-token-prediction layer is not
  built (:461 ignores ``model.layers.46`` / ``model.layers.92`` on load).

The KV cache is the standard DynamicCache of keys and values at kv heads x head_dim.
:meth:`Glm4Moe.memory_gap` lets through only what was checked against the CUDA sim within 1 %
(tests/test_glm4_moe.py).
"""
from __future__ import annotations

from ..configcheck import ConfigError
from ..setup import Device, Mode
from .base import QKNorm, Tensor, read_common_llama
from .grouped_moe import (
    MOE_FIELDS,
    GroupedTopkMoE,
    checked_on_the_cuda_sim,
    checked_with_checkpointing,
    unchecked_sentence,
)
from .llama import LlamaStyle

#: Glm4MoeConfig's defaults of the MoE fields (configuration_glm4_moe.py:105-113)
_DEFAULTS = dict(moe_intermediate_size=1408, num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128,
                 n_group=1, topk_group=1, first_k_dense_replace=1)
#: the (name, value) pairs kept in ModelSpec.family_fields (use_qk_norm as 0 / 1)
_FIELDS = ("use_qk_norm",) + MOE_FIELDS


class Glm4Moe(GroupedTopkMoE, LlamaStyle):
    model_types = ("glm4_moe",)
    family = "glm4_moe"
    switches = ()  # only transformers 5.24's layout is read (fused experts)
    # peft has no default target_modules for glm4_moe (peft/utils/constants.py: absent)
    peft_targets = ()
    checkpoint_detail = "an fp8 checkpoint is built unquantized from its config; the router's weight stays fp32"
    moe_source = ("modeling_glm4_moe.py:282-307, :376-383", "Glm4Moe")

    def read(self, f, model_type):
        out = read_common_llama(f)  # hidden, layers, heads, kv heads, head_dim, intermediate_size, vocab
        qk_norm = f.bool("use_qk_norm", False)
        rope = f.config.get("rope_parameters")
        factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        factor = f.config.get("partial_rotary_factor", 0.5) if factor is None else factor
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1 \
                or int(out["head_dim"] * factor) % 2:
            raise ConfigError(f"{f.where}: partial_rotary_factor must be a number in (0, 1] giving an even rotary "
                              f"width of head_dim {out['head_dim']} (modeling_glm4_moe.py:75-81); got {factor!r}")
        moe, ints = self.read_moe(f, out, _DEFAULTS)
        ints["use_qk_norm"] = int(qk_norm)
        # o_proj has no bias whatever attention_bias says (modeling_glm4_moe.py:197)
        return dict(out, **moe, o_bias=False, family_fields=tuple((k, ints[k]) for k in _FIELDS))

    def base_traits(self, spec):
        # apply_rotary_pos_emb's torch.cat([q_embed, q_pass]) (modeling_glm4_moe.py:169-170) makes q
        # contiguous in (b, heads, s, d), so a trainable o_proj saves the merged heads' copy (measured
        # on the CUDA sim: 4 MiB a layer at b2 x s1024, q_dim 1024, -1.5 % of the forward without it);
        # q_norm / k_norm per head before the transpose, as Qwen3 (:219-221)
        qk = {"qk_norm": QKNorm.HEAD} if _fields(spec)["use_qk_norm"] else {}
        return {"rotary_concat": True, **qk}

    # --- the inventory ------------------------------------------------------------------

    def _attention(self, spec):
        return LlamaStyle.linears(self, spec)[:4]  # q_proj, k_proj, v_proj, o_proj (o_bias False)

    def linears(self, spec):
        """An MoE layer's matrices: q/k/v/o, the routed experts, the router, the shared experts."""
        return self._attention(spec) + self.moe_linears(spec)

    def dense_linears(self, spec):
        return self._attention(spec) + self.dense_mlp_linears(spec)

    def layer_norms(self, spec):
        """input_layernorm, post_attention_layernorm (h each) and with ``use_qk_norm`` q_norm,
        k_norm (head_dim each; modeling_glm4_moe.py:199-201, :407-408)."""
        d = spec.head_dim
        qk = [Tensor("q_norm.weight", "norms", d, 1), Tensor("k_norm.weight", "norms", d, 1)] \
            if _fields(spec)["use_qk_norm"] else []
        return super().layer_norms(spec) + qk

    # --- the memory terms ---------------------------------------------------------------

    def saved_quirk(self, spec, setup, terms):
        """One layer's saved tensors in training: the generic Llama/Qwen3-style attention terms
        (norms, the normed inputs, q/k/v and the output the sdpa kernel keeps, the q/k norms) and
        DeepSeek-V3's MoE terms (:meth:`GroupedTopkMoE.moe_saved`) in place of the generic MLP ones."""
        return self.moe_saved(spec, setup, self.moe_base(spec, setup, terms))

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """The no-grad prefill's MoE layer working set (:meth:`GroupedTopkMoE.moe_prefill`) in place
        of the generic MLP's; the attention's stays the generic one."""
        return resid, self.moe_prefill(spec, setup), attn

    # --- what is not modelled -----------------------------------------------------------

    def memory_gap(self, spec, setup):
        """The setups whose every phase was checked within 1 % (4 layers, 1 dense + 3 MoE, 16 experts
        top-4, b2 x s1024 bf16: tests/test_glm4_moe.py): against the CUDA sim, full training, LoRA on the
        attention projections or all-linear, inference (prefill and decode), an eval forward without a
        cache; against real CPU steps the same but all-linear (its optimizer step measured -2.00 %: 4 MiB
        of temporaries beside the experts' adapters not read yet; full -0.40 % at most, LoRA on q/k/v/o
        -0.60 %, prefill -0.09 %, decode -0.06 %, eval -0.05 %); with checkpointing, on the CUDA sim,
        full training and LoRA on q/k/v/o or all-linear (:func:`checked_with_checkpointing`; measured
        backward full -0.05 %, q/k/v/o -0.06 %, all-linear -0.33 %, the first or last MoE layer's
        routing-weight backward, GroupedTopkMoE.recomputed_experts_backward; -9.0 / -10.1 % for full /
        all-linear before it). bf16, sdpa, one device; the rest is refused in one sentence (checkpointing
        on the CPU and with other targets not measured)."""
        attention = {lin.name for lin in self._attention(spec)}
        if checked_on_the_cuda_sim(setup, attention) or checked_with_checkpointing(setup, attention):
            return ""
        # CPU sdpa takes its flash kernel for equal head sizes: the generic terms hold there too
        if checked_on_the_cuda_sim(setup, attention, Device.CPU) and (
                setup.mode is not Mode.LORA or set(setup.lora_targets) <= attention):
            return ""
        return unchecked_sentence(spec, setup, "glm4_moe", "its MoE layers", attention,
                                  also=", or the same but all-linear on the CPU, and full training or "
                                  "those LoRA targets with checkpointing on CUDA")


def _fields(spec) -> dict:
    return dict(spec.family_fields)


ARCHS = (Glm4Moe(),)
