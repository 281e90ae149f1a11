"""Gemma 3 text (Gemma3ForCausalLM, ``gemma3_text``): Gemma 2's four norms per layer and
scaled embeddings, per-head q/k norms in Gemma's ``(1 + weight)`` form, no attention
soft-capping by default, and sliding-window layers beside global ones (``layer_types``).

Sources (transformers 5.24): models/gemma3/modeling_gemma3.py:89-100
(Gemma3TextScaledWordEmbedding: the embedding times ``embed_scale``), :119-133 (Gemma3RMSNorm:
``(x_normed * (1 + weight.float())).type_as(x)``), :290-311 (scaling by
``query_pre_attn_scalar``, ``attn_logit_softcapping``, ``sliding_window`` on the layers whose
type is sliding_attention, q_norm and k_norm on head_dim), :329-330 (q/k normed before rotary);
configuration_gemma3.py:73-97 (head_dim 256, tie_word_embeddings True, attn and final
soft-capping None, sliding_window 4096).
"""
from __future__ import annotations

from ..configcheck import MAX_HEAD_DIM, MAX_LAYERS
from .base import QKNorm, Tensor
from .gemma import Gemma2


class Gemma3Text(Gemma2):
    model_types = ("gemma3_text",)
    qk_norm = QKNorm.HEAD

    def layer_norms(self, spec):
        d = spec.head_dim
        return super().layer_norms(spec) + [Tensor("q_norm.weight", "norms", d, 1),
                                            Tensor("k_norm.weight", "norms", d, 1)]

    def read(self, f, model_type):
        out = super().read(f, model_type)
        if f.config.get("head_dim") is None:  # Gemma3TextConfig's default
            out["head_dim"] = f.int("head_dim", limit=MAX_HEAD_DIM, default=256)
        f.int("sliding_window_pattern", limit=MAX_LAYERS, default=6)
        return out

    def layer_types(self, spec):
        types = spec.config.get("layer_types")
        if isinstance(types, list):
            return list(types)
        # Gemma3TextConfig: every sliding_window_pattern-th layer (default 6) is global
        pattern = spec.config.get("sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(spec.num_layers)]

    def sliding_window(self, spec):
        return super().sliding_window(spec) if "sliding_window" in spec.config else 4096  # the class default

    def base_traits(self, spec):
        # Gemma3TextConfig: attn_logit_softcapping defaults to None (Gemma 2's to 50.0)
        # the sliding layers' rotary tables are their own (rotary_emb_local, rope_local_base_freq)
        return {"attn_softcap": spec.config.get("attn_logit_softcapping") is not None, "local_rotary": True}


ARCHS = (Gemma3Text(),)
