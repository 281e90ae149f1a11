"""Llama-style decoders (LlamaForCausalLM, MistralForCausalLM): RMSNorm, rotary positions,
a gated (SwiGLU) MLP, grouped-query attention with q/k/v/o projections.

Sources (transformers 5.24): models/llama/modeling_llama.py (LlamaAttention q_proj, k_proj,
v_proj, o_proj; LlamaMLP gate_proj, up_proj, down_proj; LlamaRMSNorm; eager_attention_forward's
``softmax(dtype=torch.float32).to(query.dtype)``), configuration_llama.py (field names and
defaults: ``tie_word_embeddings`` False, ``num_key_value_heads`` None -> heads,
``attention_bias`` and ``mlp_bias`` False); models/mistral/ the same layout.
A Llama-style config with ``num_local_experts`` builds a Mixtral-style MoE block
(:class:`LlamaStyle.linears`).
"""
from __future__ import annotations

from .base import QKV, Arch, Linear, Norm, Softmax, Switch, read_common_llama

#: The Llama family computed every position's logits in a no-grad prefill before
#: ``num_logits_to_keep`` (4.45.0 models/llama/modeling_llama.py:1214), and copied them to fp32
#: (4.44.2 :1208-1209 ``logits = logits.float()``; 4.42.4 :1193-1194, also Qwen2 :1236,
#: Gemma-2 :1093, Phi-3 :1345, Mistral :1215).
PREFILL_SWITCHES = (
    Switch("prefill_full_logits", "4.45", False, True,
           "4.45.0 models/llama/modeling_llama.py:1214 num_logits_to_keep; 4.44.2 :1208"),
    Switch("prefill_logits_fp32", "4.45", False, True, "4.44.2 models/llama/modeling_llama.py:1208-1209"),
)


class LlamaStyle(Arch):
    """The base of every Llama-style family: subclasses change a field or a trait."""

    model_types = ("llama",)
    family = "llama"
    tie_default = False  # LlamaConfig / MistralConfig pass tie_word_embeddings=False
    norm = Norm.RMS
    qkv = QKV.SEPARATE
    eager_softmax = Softmax.UPCAST
    switches = PREFILL_SWITCHES

    def read(self, f, model_type):
        return read_common_llama(f)

    def linears(self, spec):
        h, f = spec.hidden_size, spec.intermediate_size
        q, kv = spec.q_dim, spec.kv_dim
        attention = [Linear("q_proj", "attention", h, q, spec.qkv_bias),
                     Linear("k_proj", "attention", h, kv, spec.qkv_bias),
                     Linear("v_proj", "attention", h, kv, spec.qkv_bias),
                     Linear("o_proj", "attention", q, h, spec.o_bias)]
        if spec.num_experts:
            # MixtralSparseMoeBlock (transformers 5): router `gate` and MixtralExperts with fused
            # 3-D parameters gate_up_proj (E, 2f, h) and down_proj (E, h, f)
            # (5.0.0 models/mixtral/modeling_mixtral.py:63-72)
            e = spec.num_experts
            return attention + [Linear("gate", "mlp", h, e, False, router=True),
                                Linear("gate_up_proj", "mlp", h, 2 * f, False, copies=e, fused_experts=True,
                                       parts=2),
                                Linear("down_proj", "mlp", f, h, False, copies=e, fused_experts=True)]
        return attention + [Linear("gate_proj", "mlp", h, f, spec.mlp_bias),
                            Linear("up_proj", "mlp", h, f, spec.mlp_bias),
                            Linear("down_proj", "mlp", f, h, spec.mlp_bias)]


class Mistral(LlamaStyle):
    """Mistral: Llama's layout; with a ``sliding_window`` every layer slides (5.24
    models/mistral/modeling_mistral.py:173 passes it to attention, :355 builds the sliding mask
    for the model)."""

    model_types = ("mistral",)

    def layer_types(self, spec):
        return ["sliding_attention"] * spec.num_layers


class Fallback(LlamaStyle):
    """A model type without a formula: its config read under Llama's names, its parameters
    counted on a meta-device build (estimator/params.py meta_count), its activations from the
    Llama-style terms. No version switch applies; the softmax is taken in the compute dtype."""

    model_types = ()
    family = "other"
    tie_default = True  # PretrainedConfig's default
    eager_softmax = Softmax.COMPUTE
    switches = ()
    exact = False


ARCHS = (LlamaStyle(), Mistral())
