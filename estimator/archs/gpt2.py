"""GPT-2 (GPT2LMHeadModel): learned positions, a fused c_attn whose q, k and v are views,
Conv1D weights stored (in, out), LayerNorm, a GELU-tanh MLP and tied embeddings.

Sources (transformers 5.24): models/gpt2/modeling_gpt2.py (GPT2Attention.c_attn/c_proj,
GPT2MLP.c_fc/c_proj, all Conv1D with bias; eager_attention_forward :55-73, softmax in the
compute dtype then ``.type(value.dtype)``); configuration_gpt2.py (n_embd, n_head, n_layer,
n_positions, n_inner (None: 4 * n_embd), activation_function "gelu_new", resid/embd/attn_pdrop
0.1); peft's default target ``c_attn``.
"""
from __future__ import annotations

from ..configcheck import MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, check_shapes
from .base import QKV, Arch, Linear, Norm, Softmax, Switch


class GPT2(Arch):
    model_types = ("gpt2",)
    family = "gpt2"
    tie_default = True  # GPT2Config keeps PretrainedConfig's True
    peft_targets = ("c_attn",)
    qkv = QKV.FUSED_VIEWS
    norm = Norm.LAYER
    eager_softmax = Softmax.COMPUTE
    switches = (
        # GPT-2's own attention classes before 4.48 (4.42.4 models/gpt2/modeling_gpt2.py:563
        # GPT2SdpaAttention; 4.46.0 :458) hand sdpa the (b, heads, s, d) views of c_attn's output
        # without contiguous() (4.42.4 :641-644 only for torch < 2.2 with a mask); 4.48.3 :328 uses
        # the shared ALL_ATTENTION_FUNCTIONS (4.47 not read, taken as the old classes)
        Switch("sdpa_gets_views", "4.48", False, True, "4.42.4 models/gpt2/modeling_gpt2.py:563, :641-644; "
               "4.48.3 :328"),
        # a (n_positions, n_positions) bool causal mask and a scalar masked_bias per layer (4.42.4
        # :142-149; still in 4.50.0 :162-169; gone by 5.24); taken at 4.51, the first release not read
        Switch("causal_mask_buffers", "4.51", False, True, "4.42.4 models/gpt2/modeling_gpt2.py:142-149; "
               "4.50.0 :162-169"),
        # logits_to_keep from 4.53.0 (:1166; 4.52.1 :1233 lm_head(hidden_states))
        Switch("prefill_full_logits", "4.53", False, True, "4.53.0 models/gpt2/modeling_gpt2.py:1166; 4.52.1 :1233"),
        # tuples through 4.50.0, the newest wheel read (:308 present = (key_states, value_states);
        # 4.42.4 :339), a Cache in 5.x; taken at 4.51
        Switch("tuple_cache", "4.51", False, True, "4.50.0 models/gpt2/modeling_gpt2.py:308; 4.42.4 :339"),
    )

    def read(self, f, model_type):
        h = f.int("n_embd", "hidden_size", limit=MAX_HIDDEN)
        heads = f.int("n_head", "num_attention_heads", limit=MAX_HEADS)
        check_shapes(f.where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("n_positions", "max_position_embeddings", limit=MAX_POSITIONS)
        return dict(
            hidden_size=h, num_layers=f.int("n_layer", "num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("n_inner", limit=MAX_INTERMEDIATE, default=4 * h),  # GPT2MLP: n_inner or 4*h
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("activation_function", default="gelu_new"),
            norm="layernorm", norms_per_layer=2, qkv_bias=True, o_bias=True, mlp_bias=True,
            # GPT2Config defaults: resid/embd/attn_pdrop = 0.1
            attn_dropout=f.fraction("attn_pdrop", 0.1), resid_dropout=f.fraction("resid_pdrop", 0.1),
            embd_dropout=f.fraction("embd_pdrop", 0.1), learned_positions=positions)

    def linears(self, spec):
        h, f = spec.hidden_size, spec.intermediate_size
        return [Linear("c_attn", "attention", h, 3 * h, True, conv1d=True),
                Linear("c_proj", "attention", h, h, True, conv1d=True),
                Linear("c_fc", "mlp", h, f, True, conv1d=True),
                Linear("c_proj", "mlp", f, h, True, conv1d=True)]


ARCHS = (GPT2(),)
