"""OLMo 3 (Olmo3ForCausalLM): OLMo 2's post-norm layers and q/k norms with sliding-window
layers (three sliding, then one global) that rotate with their own tables.

Sources (transformers 5.24): models/olmo3/configuration_olmo3.py:64-86 and ``__post_init__``
(layer_types default: ``sliding_attention`` unless (i + 1) % 4 == 0; sliding_window 4096;
tie_word_embeddings False), models/olmo3/modeling_olmo3.py:165 (the window on sliding layers),
:422 (the sliding mask), :428 (position embeddings per layer type).
"""
from __future__ import annotations

from .olmo2 import Olmo2


class Olmo3(Olmo2):
    model_types = ("olmo3",)

    def layer_types(self, spec):
        types = spec.config.get("layer_types")
        if isinstance(types, list):
            return list(types)
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(spec.num_layers)]

    def sliding_window(self, spec):
        return super().sliding_window(spec) if "sliding_window" in spec.config else 4096  # the class default

    def base_traits(self, spec):
        return dict(super().base_traits(spec), local_rotary=True)


ARCHS = (Olmo3(),)
