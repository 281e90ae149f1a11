"""Qwen3 (Qwen3ForCausalLM): a Llama-style decoder whose queries and keys are RMS-normed per
head (``q_norm``, ``k_norm`` of (head_dim,)) before the rotary embedding.

Sources (transformers 5.24): models/qwen3/modeling_qwen3.py:50-64 (Qwen3RMSNorm, Llama's),
:217-231 (q/k/v/o_proj with ``attention_bias``, q_norm and k_norm on the head dim), :245-250
(``q_norm(q_proj(x).view(..., head_dim))`` then rotary); configuration_qwen3.py:67-93
(head_dim 128, tie_word_embeddings False, attention_bias False, use_sliding_window False).
With ``use_sliding_window`` the layers from ``max_window_layers`` on slide (kernels.masked_layers).
"""
from __future__ import annotations

from ..configcheck import MAX_HEAD_DIM, MAX_LAYERS
from .base import QKNorm, Tensor
from .llama import LlamaStyle
from .qwen2 import max_window_layer_types


class Qwen3(LlamaStyle):
    model_types = ("qwen3",)
    qk_norm = QKNorm.HEAD

    def read(self, f, model_type):
        f.bool("use_sliding_window", False)
        f.int("max_window_layers", limit=MAX_LAYERS, default=28)
        out = super().read(f, model_type)
        if f.config.get("head_dim") is None:  # Qwen3Config's default, not hidden_size // heads
            out["head_dim"] = f.int("head_dim", limit=MAX_HEAD_DIM, default=128)
        return out

    def sliding_window(self, spec):
        # Qwen3Config: sliding_window only with use_sliding_window (configuration_qwen3.py:86)
        return super().sliding_window(spec) if spec.config.get("use_sliding_window") else 0

    def layer_types(self, spec):
        # the layers from max_window_layers on slide (configuration_qwen3.py:90-93)
        return max_window_layer_types(spec)

    def layer_norms(self, spec):
        # q_norm, k_norm (head_dim,) after the layer's two norms (named_parameters order aside)
        d = spec.head_dim
        return super().layer_norms(spec) + [Tensor("q_norm.weight", "norms", d, 1),
                                            Tensor("k_norm.weight", "norms", d, 1)]


ARCHS = (Qwen3(),)
