"""BioGPT (BioGptForCausalLM): an OPT-like pre-LN decoder with q/k/v/out_proj and fc1/fc2
(all biased), GELU, learned positions with an offset of 2 rows, word embeddings scaled by
sqrt(h), a tied output projection.

Sources: transformers 5.24 configuration_biogpt.py:43-61 (hidden_dropout_prob and
attention_probs_dropout_prob 0.1, intermediate_size 4096, max_position_embeddings 1024,
``tie_word_embeddings`` True :61); models/biogpt/modeling_biogpt.py (:57-59 the offset; :112
softmax in the compute dtype; :293 the residual sum; :392-393 the positions' output kept).
peft has no default target for biogpt: it gets the common q_proj, v_proj.
"""
from __future__ import annotations

from ..configcheck import MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, check_shapes
from .base import QKV, Arch, Linear, Norm, Softmax, Switch


class BioGPT(Arch):
    model_types = ("biogpt",)
    family = "biogpt"
    tie_default = True  # BioGptConfig (configuration_biogpt.py:61)
    qkv = QKV.SEPARATE
    norm = Norm.LAYER
    eager_softmax = Softmax.COMPUTE
    switches = (
        # tuples through 4.50.0 (models/biogpt/modeling_biogpt.py:182), a Cache in 4.52.4 (:167); taken at 4.51
        Switch("tuple_cache", "4.51", False, True, "4.50.0 models/biogpt/modeling_biogpt.py:182; 4.52.4 :167"),
        # logits_to_keep from 4.57.0 (none in 4.56.0)
        Switch("prefill_full_logits", "4.57", False, True, "4.57.0 models/biogpt/modeling_biogpt.py; none in 4.56.0"),
        # its own CrossEntropyLoss through 4.46.0 (:787; 4.48.3 :788 self.loss_function; taken at 4.47, not read)
        Switch("loss_in_compute_dtype", "4.47", False, True, "4.46.0 models/biogpt/modeling_biogpt.py:787; "
               "4.48.3 :788"),
    )

    def read(self, f, model_type):
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(f.where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("max_position_embeddings", limit=MAX_POSITIONS, default=1024)
        f.bool("scale_embedding", True)
        f.fraction("activation_dropout", 0.0)
        f.fraction("layerdrop", 0.0)
        return dict(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("intermediate_size", limit=MAX_INTERMEDIATE, default=4096),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("hidden_act", default="gelu"), norm="layernorm", norms_per_layer=2,
            qkv_bias=True, o_bias=True, mlp_bias=True,
            attn_dropout=f.fraction("attention_probs_dropout_prob", 0.1),
            resid_dropout=f.fraction("hidden_dropout_prob", 0.1), embd_dropout=f.fraction("hidden_dropout_prob", 0.1),
            learned_positions=positions + 2)

    def linears(self, spec):
        h, f = spec.hidden_size, spec.intermediate_size
        return [Linear("q_proj", "attention", h, h, True), Linear("k_proj", "attention", h, h, True),
                Linear("v_proj", "attention", h, h, True), Linear("out_proj", "attention", h, h, True),
                Linear("fc1", "mlp", h, f, True), Linear("fc2", "mlp", f, h, True)]

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """BioGptModel.forward keeps the learned positions' output referenced beside the word
        embeddings (modeling_biogpt.py:392-393); the MLP runs with the attention block's
        residual sum beside the layer input (:293)."""
        extra = setup.precision.compute_bytes * spec.hidden_size * setup.batch * setup.seq
        return resid + extra, mlp + extra, attn


ARCHS = (BioGPT(),)
