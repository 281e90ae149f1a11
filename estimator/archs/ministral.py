"""Ministral (MinistralForCausalLM): Mistral's layout with ``layer_types``, every layer sliding
by default when the config has a window.

Sources (transformers 5.24): models/ministral/configuration_ministral.py:65-96 (head_dim None
-> hidden_size // heads, sliding_window 4096, layer_types default ``sliding_attention`` for
every layer with a window, tie_word_embeddings False), models/ministral/modeling_ministral.py:155
(the window on sliding layers), :388 (the sliding mask).
"""
from __future__ import annotations

from .llama import LlamaStyle


class Ministral(LlamaStyle):
    model_types = ("ministral",)

    def layer_types(self, spec):
        types = spec.config.get("layer_types")
        if isinstance(types, list):
            return list(types)
        return ["sliding_attention"] * spec.num_layers

    def sliding_window(self, spec):
        return super().sliding_window(spec) if "sliding_window" in spec.config else 4096  # the class default


ARCHS = (Ministral(),)
