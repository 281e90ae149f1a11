"""Granite (GraniteForCausalLM): a Llama-style decoder with multipliers on the embeddings, the
residual branches, the attention scores and the logits.

Sources (transformers 5.24): models/granite/modeling_granite.py:124 (``scaling =
attention_multiplier``), :275, :280 (``residual + hidden_states * residual_multiplier``: a
product by a Python float, nothing saved), :388 (``inputs_embeds * embedding_multiplier``),
:489 (``logits = logits / logits_scaling``, rebinding the logits: the unscaled ones are freed);
configuration_granite.py:63-85 (the multipliers default 1.0; tie_word_embeddings False).
"""
from __future__ import annotations

from .llama import LlamaStyle


class Granite(LlamaStyle):
    model_types = ("granite",)

    def read(self, f, model_type):
        out = super().read(f, model_type)
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            f.number(key)  # checked as numbers; no memory term reads them
        return out


ARCHS = (Granite(),)
