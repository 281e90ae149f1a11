"""GPT-BigCode / StarCoder (GPTBigCodeForCausalLM): GPT-2's layout (learned positions,
LayerNorm, a non-gated MLP, tied embeddings, dropouts) with nn.Linear weights and
multi-query attention: one fused c_attn (h -> h + 2 * head_dim) whose q, k and v are views.

Sources (transformers 5.24): models/gpt_bigcode/modeling_gpt_bigcode.py:116-161 (kv heads 1
with ``multi_query``; ``c_attn = nn.Linear(h, h + 2 * kv_dim)``), :201-211 (q, k, v split out
of c_attn's output as views), :90-113 (eager: repeat_kv, softmax upcast to fp32), :243-257
(c_fc, act, c_proj); configuration_gpt_bigcode.py:58-79 (n_inner None -> 4 * n_embd,
activation_function gelu_pytorch_tanh, resid/embd/attn_pdrop 0.1, multi_query True,
tie_word_embeddings True). peft's default target: c_attn.
"""
from __future__ import annotations

from ..configcheck import MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, check_shapes
from .base import Linear, Softmax
from .gpt2 import GPT2


class GPTBigCode(GPT2):
    model_types = ("gpt_bigcode",)
    family = "gpt_bigcode"
    eager_softmax = Softmax.UPCAST
    switches = ()

    def read(self, f, model_type):
        h = f.int("n_embd", "hidden_size", limit=MAX_HIDDEN)
        heads = f.int("n_head", "num_attention_heads", limit=MAX_HEADS)
        kv = 1 if f.bool("multi_query", True) else heads
        check_shapes(f.where, h, heads, kv, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("n_positions", "max_position_embeddings", limit=MAX_POSITIONS)
        return dict(
            hidden_size=h, num_layers=f.int("n_layer", "num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=kv, head_dim=h // heads,
            intermediate_size=f.int("n_inner", limit=MAX_INTERMEDIATE, default=4 * h),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("activation_function", default="gelu_pytorch_tanh"),
            norm="layernorm", norms_per_layer=2, qkv_bias=True, o_bias=True, mlp_bias=True,
            attn_dropout=f.fraction("attn_pdrop", 0.1), resid_dropout=f.fraction("resid_pdrop", 0.1),
            embd_dropout=f.fraction("embd_pdrop", 0.1), learned_positions=positions)

    def buffer_bytes(self, spec, tr, param_bytes):
        """GPTBigCodeModel registers one (n_positions, n_positions) bool causal mask ``bias``
        (modeling_gpt_bigcode.py, ``register_buffer("bias", torch.tril(...))``), measured on the sim."""
        return spec.max_positions ** 2

    def linears(self, spec):
        h, f = spec.hidden_size, spec.intermediate_size
        return [Linear("c_attn", "attention", h, h + 2 * spec.kv_dim, True),
                Linear("c_proj", "attention", h, h, True),
                Linear("c_fc", "mlp", h, f, True), Linear("c_proj", "mlp", f, h, True)]


ARCHS = (GPTBigCode(),)
