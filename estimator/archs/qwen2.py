"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): a Llama-style decoder with biased q/k/v projections.

Sources: transformers 5.24 models/qwen2/modeling_qwen2.py (Qwen2Attention: q_proj, k_proj,
v_proj with bias, o_proj without); configuration_qwen2.py (``tie_word_embeddings`` False).
Until 4.44 every attention layer kept its own rotary cos/sin tables (4.44.2
models/qwen2/modeling_qwen2.py:160-161, built per layer :276; 4.45.0 one model-level
Qwen2RotaryEmbedding :874 without them).
"""
from __future__ import annotations

from .base import Switch
from .llama import PREFILL_SWITCHES, LlamaStyle


class Qwen2(LlamaStyle):
    model_types = ("qwen2",)
    switches = PREFILL_SWITCHES + (
        Switch("rotary_tables_per_layer", "4.45", False, True,
               "4.44.2 models/qwen2/modeling_qwen2.py:160-161, :276; 4.45.0 :874"),)

    def sliding_window(self, spec):
        # Qwen2Config: sliding_window only with use_sliding_window (configuration_qwen2.py:83)
        return super().sliding_window(spec) if spec.config.get("use_sliding_window") else 0

    def layer_types(self, spec):
        # the layers from max_window_layers on slide (configuration_qwen2.py:87-92)
        return max_window_layer_types(spec)

    def read(self, f, model_type):
        out = super().read(f, model_type)
        return dict(out, qkv_bias=True, o_bias=False)  # Qwen2Attention: q/k/v biased, o_proj not


ARCHS = (Qwen2(),)


def max_window_layer_types(spec) -> list[str]:
    """The config's ``layer_types`` where it lists them, else the Qwen configurations' rule:
    the layers from ``max_window_layers`` (default 28) on slide (Qwen2Config and Qwen3Config
    alike: configuration_qwen2.py:87-92, configuration_qwen3.py:90-93)."""
    types = spec.config.get("layer_types")
    if isinstance(types, list):
        return list(types)
    first = spec.config.get("max_window_layers", 28)
    return ["sliding_attention" if i >= first else "full_attention" for i in range(spec.num_layers)]
