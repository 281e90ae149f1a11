"""Gemma and Gemma 2 (GemmaForCausalLM, Gemma2ForCausalLM): Llama-style decoders with
GemmaRMSNorm's ``(1 + weight)`` computed in fp32, a GeGLU MLP and tied embeddings.

Sources (transformers 5.24): models/gemma/modeling_gemma.py (GemmaRMSNorm:
``output * (1.0 + self.weight.float())``, the normed input kept in fp32);
configuration_gemma.py / configuration_gemma2.py (``tie_word_embeddings`` True);
models/gemma2/modeling_gemma2.py (Gemma2DecoderLayer: input, post_attention,
pre_feedforward and post_feedforward norms; attention scores soft-capped with
``attn_logit_softcapping``, default 50.0: ``tanh(scores / cap) * cap``; the final logits
with ``final_logit_softcapping``).
"""
from __future__ import annotations

from .base import Norm
from .llama import LlamaStyle


class Gemma(LlamaStyle):
    model_types = ("gemma",)
    tie_default = True
    norm = Norm.RMS_ONE_PLUS


class Gemma2(Gemma):
    model_types = ("gemma2",)

    def read(self, f, model_type):
        out = super().read(f, model_type)
        f.number("attn_logit_softcapping")  # checked here, read by base_traits
        return dict(out, norms_per_layer=4)

    def base_traits(self, spec):
        # Gemma2Config default attn_logit_softcapping=50.0; null turns it off
        return {"attn_softcap": spec.config.get("attn_logit_softcapping", 50.0) is not None}


ARCHS = (Gemma(), Gemma2())
