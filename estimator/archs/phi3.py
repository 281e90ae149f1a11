"""Phi-3 (Phi3ForCausalLM): a Llama-style decoder with a fused qkv_proj and a fused gate_up_proj.

Sources (transformers 5.24): models/phi3/modeling_phi3.py (Phi3Attention.qkv_proj: q, k and v
sliced out of one projection, q and k rotated into new tensors, v a view; Phi3MLP.gate_up_proj
chunked into gate and up views); configuration_phi3.py (``tie_word_embeddings`` False).
peft has no default target for phi3; its fused ``qkv_proj`` holds the q and v projections the
others adapt.
"""
from __future__ import annotations

from .base import MLP, QKV, Linear
from .llama import LlamaStyle


class Phi3(LlamaStyle):
    model_types = ("phi3",)
    qkv = QKV.FUSED_ROTATED
    peft_targets = ("qkv_proj",)

    def mlp_kind(self, spec):
        return MLP.GATED_FUSED

    def linears(self, spec):
        h, f, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
        return [Linear("qkv_proj", "attention", h, q + 2 * kv, spec.qkv_bias),
                Linear("o_proj", "attention", q, h, spec.o_bias),
                Linear("gate_up_proj", "mlp", h, 2 * f, spec.mlp_bias),
                Linear("down_proj", "mlp", f, h, spec.mlp_bias)]


ARCHS = (Phi3(),)
