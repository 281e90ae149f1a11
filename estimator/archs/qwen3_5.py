"""Qwen3.5 text (Qwen3_5ForCausalLM, ``qwen3_5_text``): a hybrid of Gated-DeltaNet linear-attention
layers and gated full-attention layers (three linear to one full by default), Qwen3's per-head q/k
norms, zero-centred RMSNorms and a SwiGLU MLP in every layer.

Sources (transformers 5.24, models/qwen3_5/):

- configuration_qwen3_5.py:81-107 the fields and defaults (vocab 248320, hidden 4096, intermediate
  12288, 32 layers, 16 heads, 4 key/value heads, head_dim 256, ``tie_word_embeddings`` False,
  ``linear_conv_kernel_dim`` 4, ``linear_key_head_dim`` / ``linear_value_head_dim`` 128,
  ``linear_num_key_heads`` 16, ``linear_num_value_heads`` 32); :109-116 ``layer_types`` default to
  every ``full_attention_interval``-th (4) layer full, the rest ``linear_attention``; the
  multimodal ``qwen3_5`` config (:151-189) nests this one as ``text_config`` and is not read here.
- modeling_qwen3_5.py:500-543 Qwen3_5GatedDeltaNet: a depthwise ``conv1d`` (conv_dim, 1, K), no
  bias, over conv_dim = 2 x key heads x key dim + value heads x value dim; ``dt_bias`` and ``A_log``
  (value heads); ``norm`` a Qwen3_5RMSNormGated of the value head size (:204-220); ``out_proj``
  (value_dim -> h); ``in_proj_qkv`` (h -> conv_dim), ``in_proj_z`` (h -> value_dim), ``in_proj_b`` and
  ``in_proj_a`` (h -> value heads), all without bias.
- :742-767 Qwen3_5Attention: ``q_proj`` (h -> 2 x heads x head_dim: the query and its output gate),
  k_proj, v_proj, o_proj biased with ``attention_bias``, ``q_norm`` and ``k_norm`` (head_dim);
  :818-832 Qwen3_5MLP; :835-852 Qwen3_5RMSNorm ``output * (1.0 + weight.float())`` (Gemma's form);
  :855-866 Qwen3_5DecoderLayer: ``linear_attn`` or ``self_attn`` by layer type, the MLP and two norms;
  :1203-1214 Qwen3_5TextModel (embedding, final norm); :1655-1667 Qwen3_5ForCausalLM (an untied head).

The inventory holds the first layer's kind as the repeated one and the other kind as
:attr:`~estimator.archs.base.Inventory.other` (as Gemma 4's). The ModelSpec's heads, key/value heads
and head_dim are the full-attention layers'; the linear layers' sizes are family fields. The memory
terms of neither layer kind are modelled yet: :meth:`Qwen3_5Text.memory_gap` refuses every setup
in one sentence (measure it with ``vramlab profile ... --backend sim``).
"""
from __future__ import annotations

from ..configcheck import MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, ConfigError, Fields, Limit
from .base import Linear, Norm, QKNorm, Tensor
from .llama import LlamaStyle

#: Qwen3_5TextConfig's defaults (configuration_qwen3_5.py:96-101, :112)
_DEFAULTS = dict(head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                 linear_num_key_heads=16, linear_num_value_heads=32, full_attention_interval=4)
#: the layer types this family builds (modeling_qwen3_5.py:860-863)
HYBRID_LAYER_TYPES = ("linear_attention", "full_attention")
#: the (name, value) pairs kept in ModelSpec.family_fields
_FIELDS = ("linear_key_heads", "linear_value_heads", "linear_key_dim", "linear_value_dim", "conv_kernel",
           "full_layers")
#: a conv kernel of at least one tap, at most what any published config uses by far
_CONV_KERNEL = Limit("linear_conv_kernel_dim", 1, 64, "a short causal convolution (Qwen3.5 uses 4)")


def _fields(spec) -> dict:
    return dict(spec.family_fields)


def hybrid_layer_types(f: Fields, layers: int) -> list[str]:
    """The config's ``layer_types`` (one of :data:`HYBRID_LAYER_TYPES` per layer), else every
    ``full_attention_interval``-th layer full (configuration_qwen3_5.py:111-116)."""
    types = f.config.get("layer_types")
    if types is None:
        interval = f.int("full_attention_interval", limit=Limit("full_attention_interval", 1, MAX_LAYERS.hi,
                                                                  "a layer count"),
                         default=_DEFAULTS["full_attention_interval"])
        return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not all(t in HYBRID_LAYER_TYPES for t in types):
        raise ConfigError(f"{f.where}: layer_types must name one of {', '.join(HYBRID_LAYER_TYPES)} for each of "
                          f"the {layers} layers")
    return list(types)


class Qwen3_5Text(LlamaStyle):
    model_types = ("qwen3_5_text",)
    family = "qwen3_5"
    tie_default = False  # Qwen3_5TextConfig.tie_word_embeddings (configuration_qwen3_5.py:92)
    norm = Norm.RMS_ONE_PLUS  # Qwen3_5RMSNorm (modeling_qwen3_5.py:835-852)
    qk_norm = QKNorm.HEAD
    switches = ()  # only transformers 5.24's layout is read
    # peft 0.21 has no default target_modules for qwen3_5_text (peft/utils/constants.py lists qwen3,
    # not qwen3_5): LoRA needs named targets
    peft_targets = ()

    # --- reading the config ----------------------------------------------------------

    def read(self, f, model_type):
        config = f.config
        # read_common_llama checks layer_types against sliding/full only: the hybrid types are checked here
        out = super().read(Fields({k: v for k, v in config.items() if k != "layer_types"}, f.where), model_type)
        if config.get("head_dim") is None:  # Qwen3_5TextConfig's default, not hidden_size // heads
            out["head_dim"] = f.int("head_dim", limit=MAX_HEAD_DIM, default=_DEFAULTS["head_dim"])
        kh = f.int("linear_num_key_heads", limit=MAX_HEADS, default=_DEFAULTS["linear_num_key_heads"])
        vh = f.int("linear_num_value_heads", limit=MAX_HEADS, default=_DEFAULTS["linear_num_value_heads"])
        if vh % kh:
            raise ConfigError(f"{f.where}: linear_num_key_heads ({kh}) must divide linear_num_value_heads ({vh}) "
                              f"(torch_chunk_gated_delta_rule repeats each key head, modeling_qwen3_5.py:324-326)")
        ints = dict(linear_key_heads=kh, linear_value_heads=vh,
                    linear_key_dim=f.int("linear_key_head_dim", limit=MAX_HEAD_DIM,
                                         default=_DEFAULTS["linear_key_head_dim"]),
                    linear_value_dim=f.int("linear_value_head_dim", limit=MAX_HEAD_DIM,
                                           default=_DEFAULTS["linear_value_head_dim"]),
                    conv_kernel=f.int("linear_conv_kernel_dim", limit=_CONV_KERNEL,
                                      default=_DEFAULTS["linear_conv_kernel_dim"]))
        types = hybrid_layer_types(f, out["num_layers"])
        # the full layers' indices: part of the spec's hash, as the config (and its layer_types) is not
        ints["full_layers"] = tuple(i for i, t in enumerate(types) if t == "full_attention")
        return dict(out, family_fields=tuple((k, ints[k]) for k in _FIELDS))

    def layer_types(self, spec):
        full = set(_fields(spec)["full_layers"])
        return ["full_attention" if i in full else "linear_attention" for i in range(spec.num_layers)]

    def sliding_window(self, spec):
        return 0  # no sliding layers (modeling_qwen3_5.py:855-866)

    # --- the inventory ------------------------------------------------------------------

    def _kinds(self, spec) -> list[tuple[str, int]]:
        """Each layer kind with its count, the first layer's first."""
        types = self.layer_types(spec)
        counts = {t: types.count(t) for t in dict.fromkeys(types)}
        return list(counts.items())

    def _mlp(self, spec) -> list[Linear]:
        h, f = spec.hidden_size, spec.intermediate_size
        return [Linear("gate_proj", "mlp", h, f, False), Linear("up_proj", "mlp", h, f, False),
                Linear("down_proj", "mlp", f, h, False)]

    def _kind_linears(self, spec, kind: str) -> list[Linear]:
        h = spec.hidden_size
        if kind == "full_attention":
            q, kv, bias = spec.q_dim, spec.kv_dim, spec.qkv_bias
            return [Linear("q_proj", "attention", h, 2 * q, bias), Linear("k_proj", "attention", h, kv, bias),
                    Linear("v_proj", "attention", h, kv, bias), Linear("o_proj", "attention", q, h, bias)] \
                + self._mlp(spec)
        m = _fields(spec)
        key, value = m["linear_key_heads"] * m["linear_key_dim"], m["linear_value_heads"] * m["linear_value_dim"]
        vh = m["linear_value_heads"]
        return [Linear("in_proj_qkv", "attention", h, 2 * key + value, False),
                Linear("in_proj_z", "attention", h, value, False), Linear("in_proj_b", "attention", h, vh, False),
                Linear("in_proj_a", "attention", h, vh, False), Linear("out_proj", "attention", value, h, False)] \
            + self._mlp(spec)

    def _kind_norms(self, spec, kind: str) -> list[Tensor]:
        """The layer's non-matrix tensors: its two norms, and q_norm/k_norm (full) or the depthwise
        conv1d weight (conv_dim, 1, K), dt_bias, A_log and the gated norm (linear)."""
        h = spec.hidden_size
        norms = [Tensor("norm.weight", "norms", h, 1)] * 2  # input_layernorm, post_attention_layernorm
        if kind == "full_attention":
            d = spec.head_dim
            return norms + [Tensor("q_norm.weight", "norms", d, 1), Tensor("k_norm.weight", "norms", d, 1)]
        m = _fields(spec)
        conv = 2 * m["linear_key_heads"] * m["linear_key_dim"] + m["linear_value_heads"] * m["linear_value_dim"]
        vh = m["linear_value_heads"]
        # the meta count's groups by name (params.group_of): linear_attn.* is "attention", its norm "norms"
        return norms + [Tensor("conv1d.weight", "attention", conv, m["conv_kernel"]),
                        Tensor("dt_bias", "attention", vh, 1), Tensor("A_log", "attention", vh, 1),
                        Tensor("norm.weight", "norms", m["linear_value_dim"], 1)]

    def linears(self, spec):
        return self._kind_linears(spec, self._kinds(spec)[0][0])

    def layer_norms(self, spec):
        return self._kind_norms(spec, self._kinds(spec)[0][0])

    def other_layers(self, spec):
        return [(self._kind_linears(spec, k), self._kind_norms(spec, k), n) for k, n in self._kinds(spec)[1:]]

    # --- what is not modelled -----------------------------------------------------------

    def memory_gap(self, spec, setup):
        """Every setup: neither the Gated-DeltaNet layers' saved tensors, recurrent and conv states nor
        the gated full-attention layers' terms are modelled yet."""
        return (f"{spec.name} (qwen3_5_text): its parameters are counted exactly, but its memory is not modelled "
                f"yet (Gated-DeltaNet linear-attention layers: their saved chunks and their recurrent and conv "
                f"states); measure it with `vramlab profile ... --backend sim`")


ARCHS = (Qwen3_5Text(),)
