"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): a fused query_key_value (q and k rotated into new
tensors by ``torch.cat``, v a view), partial rotary, a parallel residual, biases on every
linear, LayerNorm, exact GELU.

Sources: transformers 5.24 configuration_gpt_neox.py:61-82 (rotary_pct 0.25,
use_parallel_residual True, attention_bias True, hidden_dropout and attention_dropout 0.0,
``tie_word_embeddings`` False :78); models/gpt_neox/modeling_gpt_neox.py (:138, :196 q/k
rotated by cat, v a view; :158 softmax upcast to fp32; :161 the value matmul; :250, :261 both
norms read the layer input; the untied head ``lm_head`` in 5.x, ``embed_out`` in 4.x).
Older releases, each read in the wheel (file:line in each switch).
"""
from __future__ import annotations

from ..configcheck import MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, check_shapes
from ..units import FP32
from .base import QKV, Arch, Linear, Norm, Softmax, Switch, config_flag


class GPTNeoX(Arch):
    model_types = ("gpt_neox",)
    family = "gpt_neox"
    tie_default = False  # GPTNeoXConfig declares False (configuration_gpt_neox.py:78)
    peft_targets = ("query_key_value",)
    qkv = QKV.FUSED_ROTATED
    norm = Norm.LAYER
    switches = (
        # GPT-NeoX's own attention before 4.49: baddbmm scores and a softmax in the compute dtype
        # (4.42.4 models/gpt_neox/modeling_gpt_neox.py:281-301; 4.48.3 :114-127); 4.49.0 upcasts
        # (:121, 5.24 :158)
        Switch("eager_softmax", "4.49", Softmax.UPCAST, Softmax.COMPUTE,
               "4.42.4 models/gpt_neox/modeling_gpt_neox.py:281-301; 4.48.3 :114-127; 4.49.0 :121"),
        # ... and every attention layer registered a bool causal mask and masked_bias (4.42.4
        # :113-131; 4.48.3 :276-300; gone in 4.49.0): buffer_bytes
        Switch("causal_mask_buffers", "4.49", False, True, "4.42.4 models/gpt_neox/modeling_gpt_neox.py:113-131; "
               "4.48.3 :276-300"),
        # fp32 rotary tables returned as they are before 4.45 (4.42.4 :597-621; 4.44.2 :514-515), so
        # a 16-bit model's rotated q and k are fp32 (:246-249); 4.45.2 casts them (:649)
        Switch("rotary_fp32", "4.45", False, True, "4.42.4 models/gpt_neox/modeling_gpt_neox.py:597-621, "
               ":246-249; 4.45.2 :649"),
        # present = (key, value) through 4.44.2 (:241), layer_past.update from 4.45.2 (:303; 4.45.0 not read)
        Switch("tuple_cache", "4.45", False, True, "4.44.2 models/gpt_neox/modeling_gpt_neox.py:241; 4.45.2 :303"),
        # logits_to_keep from 4.49.0 (:796; 4.48.3 :1130 embed_out(hidden_states))
        Switch("prefill_full_logits", "4.49", False, True, "4.49.0 models/gpt_neox/modeling_gpt_neox.py:796; "
               "4.48.3 :1130"),
        # the model's own CrossEntropyLoss in the logits' dtype through 4.48.3 (:1137;
        # self.loss_function in 4.49.0 :850)
        Switch("loss_in_compute_dtype", "4.49", False, True, "4.48.3 models/gpt_neox/modeling_gpt_neox.py:1137; "
               "4.49.0 :850"),
    )

    def read(self, f, model_type):
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(f.where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        bias = f.bool("attention_bias", True)
        f.bool("use_parallel_residual", True)  # read by base_traits
        f.fraction("rotary_pct", 0.25)  # read by buffer_bytes
        return dict(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("intermediate_size", limit=MAX_INTERMEDIATE),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB),
            max_positions=f.int("max_position_embeddings", limit=MAX_POSITIONS, default=2048), gated_mlp=False,
            hidden_act=f.text("hidden_act", default="gelu"), norm="layernorm", norms_per_layer=2,
            qkv_bias=bias, o_bias=bias, mlp_bias=True,
            attn_dropout=f.fraction("attention_dropout", 0.0), resid_dropout=f.fraction("hidden_dropout", 0.0),
            embd_dropout=f.fraction("hidden_dropout", 0.0))

    def linears(self, spec):
        h, f, b = spec.hidden_size, spec.intermediate_size, spec.qkv_bias
        return [Linear("query_key_value", "attention", h, 3 * h, b), Linear("dense", "attention", h, h, b),
                Linear("dense_h_to_4h", "mlp", h, f, True), Linear("dense_4h_to_h", "mlp", f, h, True)]

    def base_traits(self, spec):
        # eager's value matmul reshapes the value view of query_key_value to (b * heads, s, d), a
        # view only for b = 1, so it saves the whole output (5.24 modeling_gpt_neox.py:161; 4.42.4 :309)
        return {"parallel_residual": config_flag(spec, "use_parallel_residual", True), "eager_value_view_b1": True}

    def buffer_bytes(self, spec, tr, param_bytes):
        """Before 4.49 each GPTNeoXAttention registers the bool causal mask, masked_bias (in
        the build dtype) and the rotary inv_freq (fp32, ``.float()``), before 4.45 beside fp32
        cos/sin tables of (max_positions, rotary dims) each (4.42.4
        models/gpt_neox/modeling_gpt_neox.py:113-131, 589-613)."""
        if not tr.causal_mask_buffers:
            return 0
        rotary = int(spec.head_dim * float(spec.config.get("rotary_pct", 0.25)))
        per_layer = spec.max_positions ** 2 + param_bytes + FP32 * (rotary // 2)
        if tr.rotary_fp32:
            per_layer += 2 * FP32 * spec.max_positions * rotary
        return spec.num_layers * per_layer

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """query_key_value's whole output (3 h) stays alive beside the rotated q and k (v is a
        view of it: 5.24 models/gpt_neox/modeling_gpt_neox.py:138, 196), with sdpa's output
        beside them; with the parallel residual the attention output is alive while the MLP
        runs (:249-263)."""
        if math:
            return resid, mlp, attn
        T, p, a, s, q = setup.batch * setup.seq, setup.precision.compute_bytes, spec.num_heads, setup.seq, spec.q_dim
        attn = (softmax * a * s + 5 * p * q) * T if setup.attn.value == "eager" else 6 * p * q * T
        if tr.parallel_residual:
            mlp += p * spec.hidden_size * T
        return resid, mlp, attn


ARCHS = (GPTNeoX(),)
