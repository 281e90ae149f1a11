"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (per-head q/k norms) with a sparse MoE
block in every layer: a router of its own class and fused 3-D experts, no shared expert.

Sources (transformers 5.24): models/qwen3_moe/modeling_qwen3_moe.py:211-247 (Qwen3MoeExperts:
``gate_up_proj`` (E, 2 * moe_intermediate_size, h), ``down_proj`` (E, h, moe_intermediate_size),
a loop over the experts hit, each gathering its tokens), :250-268 (Qwen3MoeTopKRouter: a
weight of its own, fp32 softmax, top-k), :306-311 (a layer is sparse unless in mlp_only_layers
or off decoder_sparse_step); configuration_qwen3_moe.py (num_experts, num_experts_per_tok,
moe_intermediate_size, tie_word_embeddings False). Layers of both kinds in one model
(mlp_only_layers, decoder_sparse_step > 1) are refused: one layer kind per model here.
"""
from __future__ import annotations

from ..configcheck import MAX_EXPERTS, MAX_INTERMEDIATE, MAX_LAYERS, ConfigError, check_shapes
from .qwen3 import Qwen3


class Qwen3Moe(Qwen3):
    model_types = ("qwen3_moe",)

    def read(self, f, model_type):
        out = super().read(f, model_type)
        experts = f.int("num_experts", limit=MAX_EXPERTS, default=128)
        per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=8)
        check_shapes(f.where, out["hidden_size"], out["num_heads"], out["num_kv_heads"], head_dim_given=True,
                     experts=experts, experts_per_token=per_token)
        only = f.config.get("mlp_only_layers") or []
        if only or f.int("decoder_sparse_step", limit=MAX_LAYERS, default=1) != 1:
            raise ConfigError(f"{f.where}: dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step) "
                              f"are not modelled; measure it with `vramlab profile ... --backend sim`")
        return dict(out, num_experts=experts, experts_per_token=per_token,
                    intermediate_size=f.int("moe_intermediate_size", limit=MAX_INTERMEDIATE, default=768))


ARCHS = (Qwen3Moe(),)
