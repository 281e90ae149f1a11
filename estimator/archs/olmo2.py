"""OLMo 2 (Olmo2ForCausalLM): a Llama-style decoder with the norms after the blocks
(post-norm: ``x + norm(attn(x))``, ``x + norm(mlp(x))``), RMS-normed queries and keys over
all heads, and RMSNorm computing ``(weight * x_normed).to(dtype)``.

Sources (transformers 5.24): models/olmo2/modeling_olmo2.py (Olmo2RMSNorm: the weight times
the fp32 normed input, then the cast; Olmo2Attention: ``q_norm`` of (heads * head_dim,),
``k_norm`` of (kv_heads * head_dim,) applied to the projections' outputs before the view and
rotary; Olmo2DecoderLayer: post_attention_layernorm and post_feedforward_layernorm on the
blocks' outputs, no norm before them); configuration_olmo2.py (tie_word_embeddings False,
attention_bias False).
"""
from __future__ import annotations

from .base import Norm, QKNorm, Tensor
from .llama import LlamaStyle


class Olmo2(LlamaStyle):
    model_types = ("olmo2",)
    norm = Norm.RMS_WEIGHT_FP32
    qk_norm = QKNorm.FULL

    def layer_norms(self, spec):
        # post_attention_layernorm, post_feedforward_layernorm, q_norm (q_dim,), k_norm (kv_dim,)
        return super().layer_norms(spec) + [Tensor("q_norm.weight", "norms", spec.q_dim, 1),
                                            Tensor("k_norm.weight", "norms", spec.kv_dim, 1)]

    def base_traits(self, spec):
        return {"pre_norm": False}  # the layer's input feeds q/k/v directly


ARCHS = (Olmo2(),)
