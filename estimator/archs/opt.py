"""OPT (OPTForCausalLM): learned positions with an offset of 2 rows, q/k/v/out_proj and
fc1/fc2 with biases, LayerNorm (pre- or post-LN by ``do_layer_norm_before``), ReLU.

Sources (transformers 5.24): models/opt/modeling_opt.py (OPTLearnedPositionalEmbedding's
offset of 2; OPTDecoder.project_in/project_out when ``word_embed_proj_dim`` differs from the
hidden size; ``final_layer_norm`` only with do_layer_norm_before and not
_remove_final_layer_norm; eager softmax upcast to fp32); configuration_opt.py (ffn_dim,
enable_bias True, dropout 0.1, attention_dropout 0.0, activation_function "relu").
"""
from __future__ import annotations

from ..configcheck import MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, check_shapes
from .base import QKV, Arch, Linear, Norm, Softmax, Switch, config_flag


class OPT(Arch):
    model_types = ("opt",)
    family = "opt"
    tie_default = True  # OPTConfig keeps PretrainedConfig's True
    qkv = QKV.SEPARATE
    norm = Norm.LAYER
    eager_softmax = Softmax.UPCAST
    switches = (
        # the masked scores clamped with torch.max(attn_weights, torch.tensor(finfo.min)) (4.46.0
        # models/opt/modeling_opt.py:201, 4.48.3 :201), whose backward keeps its input; 4.49.0 calls
        # eager_attention_forward without it (:168)
        Switch("eager_clamps_scores", "4.49", False, True, "4.46.0 models/opt/modeling_opt.py:201; 4.49.0 :168"),
        # logits_to_keep from 5.0.0 (:738; 4.57.0 :833 every position, .contiguous())
        Switch("prefill_full_logits", "5.0", False, True, "5.0.0 models/opt/modeling_opt.py:738; 4.57.0 :833"),
        # tuples through 4.48.3 (:316 past_key_value = (key_states, value_states)), DynamicCache from 4.49.0 (:853)
        Switch("tuple_cache", "4.49", False, True, "4.48.3 models/opt/modeling_opt.py:316; 4.49.0 :853"),
    )

    def read(self, f, model_type):
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(f.where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("max_position_embeddings", limit=MAX_POSITIONS)
        bias = f.bool("enable_bias", True)
        f.bool("do_layer_norm_before", True)  # read by final_norms and base_traits
        f.bool("_remove_final_layer_norm", False)
        return dict(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("ffn_dim", limit=MAX_INTERMEDIATE),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("activation_function", default="relu"),
            norm="layernorm", norms_per_layer=2, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
            # OPTConfig defaults: dropout 0.1, attention_dropout 0.0
            attn_dropout=f.fraction("attention_dropout", 0.0),
            resid_dropout=f.fraction("dropout", 0.1), embd_dropout=f.fraction("dropout", 0.1),
            # OPTLearnedPositionalEmbedding keeps an offset of 2 rows (modeling_opt.py)
            learned_positions=positions + 2,
            embed_dim=f.int("word_embed_proj_dim", limit=MAX_HIDDEN, default=h))

    def linears(self, spec):
        h, f, b = spec.hidden_size, spec.intermediate_size, spec.qkv_bias
        return [Linear("q_proj", "attention", h, h, b), Linear("k_proj", "attention", h, h, b),
                Linear("v_proj", "attention", h, h, b), Linear("out_proj", "attention", h, h, b),
                Linear("fc1", "mlp", h, f, b), Linear("fc2", "mlp", f, h, b)]

    def final_norms(self, spec):
        # OPTDecoder.final_layer_norm exists only with do_layer_norm_before and not _remove_final_layer_norm
        return int(config_flag(spec, "do_layer_norm_before", True)
                   and not config_flag(spec, "_remove_final_layer_norm", False))

    def base_traits(self, spec):
        # do_layer_norm_before=False (opt-350m): the norms run after the residual add
        return {"pre_norm": config_flag(spec, "do_layer_norm_before", True)}


ARCHS = (OPT(),)
