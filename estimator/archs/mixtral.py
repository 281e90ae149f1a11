"""Mixtral (MixtralForCausalLM): a Llama-style decoder whose MLP is a sparse MoE block.

Sources: transformers 5.0.0 models/mixtral/modeling_mixtral.py:63-72 (MixtralExperts with
fused 3-D ``gate_up_proj`` (E, 2f, h) and ``down_proj`` (E, h, f), router ``gate``);
configuration_mixtral.py (``num_local_experts``, ``num_experts_per_tok``,
``tie_word_embeddings`` False). Until 4.47 every attention layer kept its own rotary
cos/sin tables (4.47.0 models/mixtral/modeling_mixtral.py:200; none in 4.48.3).
"""
from __future__ import annotations

from .base import Switch
from .llama import PREFILL_SWITCHES, LlamaStyle


class Mixtral(LlamaStyle):
    model_types = ("mixtral",)
    # 5.24 models/mixtral/modeling_mixtral.py:107-111: the top-k of softmax(logits.float()), never cast back
    routing_weights_fp32 = True
    switches = PREFILL_SWITCHES + (
        Switch("rotary_tables_per_layer", "4.48", False, True,
               "4.47.0 models/mixtral/modeling_mixtral.py:200 cos_cached/sin_cached; none in 4.48.3"),)


ARCHS = (Mixtral(),)
