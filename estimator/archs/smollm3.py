"""SmolLM3 (SmolLM3ForCausalLM): a Llama-style decoder with NoPE layers (every
``no_rope_layer_interval``-th layer applies no rotary embedding) and tied embeddings.

Sources (transformers 5.24): models/smollm3/modeling_smollm3.py:192 (``use_rope =
config.no_rope_layers[layer_idx]``), :215 (rotary only where use_rope); configuration_smollm3.py
(no_rope_layer_interval 4, tie_word_embeddings True :94). A NoPE layer hands sdpa the
projections' transposed views instead of rotated copies, the same bytes saved.
"""
from __future__ import annotations

from .llama import LlamaStyle


class SmolLM3(LlamaStyle):
    model_types = ("smollm3",)
    tie_default = True

    def sliding_window(self, spec):
        # SmolLM3Config: sliding_window only with use_sliding_window
        return super().sliding_window(spec) if spec.config.get("use_sliding_window") else 0


ARCHS = (SmolLM3(),)
