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
and head_dim are the full-attention layers'; the linear layers' sizes are family fields. In training a
linear-attention layer saves what :func:`linear_attention_saved` derives from the torch fallbacks
transformers runs without the flash-linear-attention and causal-conv1d packages
(``torch_chunk_gated_delta_rule``, ``causal_conv1d_fn``: the path this estimate assumes; with fla's
chunk kernels and causal-conv1d installed the saved set is those kernels' own autograd functions', not
these ops', and is not modelled; the torch-free estimator cannot tell whether they are installed, so
this is the path it assumes, not one it checks); a full-attention layer saves the generic terms and
its output gate's. :meth:`Qwen3_5Text.memory_gap` lets through only what was checked within 1 %.
"""
from __future__ import annotations

from dataclasses import replace

from ..configcheck import MAX_HEAD_DIM, MAX_HEADS, MAX_LAYERS, ConfigError, Fields, Limit
from ..setup import Attention, Device, Mode
from ..units import FP32
from .base import LayerKinds, Linear, Norm, QKNorm, Tensor
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


class Qwen3_5Text(LayerKinds, LlamaStyle):
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

    def base_traits(self, spec):
        # apply_rotary_pos_emb rotates the first rotary_dim of each head and concatenates the rest
        # back (modeling_qwen3_5.py:689-702, partial_rotary_factor 0.25 by default): q reaches sdpa
        # as a new tensor contiguous in (b, heads, s, d), so the flash output, laid out like it, is
        # copied by ``reshape(...).contiguous()`` (:811) before the gate (kernels.attention_output_copied)
        return {"rotary_concat": True}

    # --- the memory terms ---------------------------------------------------------------

    def saved_quirk(self, spec, setup, terms):
        """The repeated layer's saved terms: a full-attention layer's are the generic ones and its
        output gate's (:func:`_gate_saved`); a linear-attention layer keeps the generic norms, normed
        input and MLP terms, and its token mixer's (:func:`linear_attention_saved`) replace the
        attention's."""
        return self._kind_terms(spec, setup, terms, self._kinds(spec)[0][0]), 0, 0

    def _kind_terms(self, spec, setup, terms, kind):
        if kind == "full_attention":
            return dict(terms, attn_gate=_gate_saved(spec, setup))
        kept = {k: v for k, v in terms.items() if k in ("norms", "linear_inputs", "mlp", "lora_adapters")}
        return dict(kept, **linear_attention_saved(spec, setup))

    def other_layers_saved(self, spec, setup, terms):
        """Per token, what the layers of the other kind save beyond the repeated layer's ``terms``: a
        full-attention layer's generic terms are those of the spec whose every layer is full
        (:func:`_full_spec`)."""
        kinds = self._kinds(spec)
        if len(kinds) == 1:
            return 0
        from ..activations import _training_activations_b1  # activations reads the registry
        own, T = sum(terms.values()), setup.batch * setup.seq
        kind, n = kinds[1]
        if kind == "full_attention":
            full = _full_spec(spec)
            other = _training_activations_b1(full, setup).layer_bytes // T
        else:  # the repeated layer is full: the linear layer's from its generic terms
            generic = {k: v for k, v in terms.items() if k != "attn_gate"}
            other = sum(self._kind_terms(spec, setup, generic, kind).values())
        return n * (other - own)

    def kv_elems(self, spec) -> int:
        """Only the full-attention layers' DynamicCache holds keys and values per token (cache_utils.py
        LinearAttentionAndFullAttentionLayer); the linear layers' states are per sequence
        (:func:`_state_bytes`)."""
        return len(_fields(spec)["full_layers"]) * 2 * spec.kv_dim

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """With a cache, the no-grad prefill's peak inside the last linear-attention layer: its
        chunked rule's working set (:func:`linear_prefill_working`), the conv and recurrent states of
        the linear layers before it and its own conv state (counted here, not as the KV cache: the
        sim's tracker labels them activations), less the keys and values of the full layers after it,
        which the cache does not hold yet."""
        if not (setup.mode is Mode.INFERENCE or setup.use_cache):
            return resid, mlp, max(attn, linear_prefill_working(spec, setup))
        types = self.layer_types(spec)
        if "linear_attention" not in types:
            return resid, mlp, attn
        last = max(i for i, t in enumerate(types) if t == "linear_attention")
        conv, state = _state_bytes(spec, setup)
        before = types[:last].count("linear_attention") * (conv + state) + conv
        later_kv = types[last:].count("full_attention") * 2 * spec.kv_dim * setup.batch * setup.seq \
            * setup.precision.compute_bytes
        return resid, mlp, max(attn, linear_prefill_working(spec, setup) + before - later_kv)

    def decode_working(self, spec, setup, tokens):
        """A decode step's linear layers: every layer's conv and recurrent state (:func:`_state_bytes`)
        and, inside ``torch_recurrent_gated_delta_rule`` (modeling_qwen3_5.py:460-470), three fp32
        (b, heads, dk, dv) states at once: the decayed state, ``k_t * delta``'s outer product and their
        sum (the cache's own state beside them)."""
        types = self.layer_types(spec)
        conv, state = _state_bytes(spec, setup)
        return types.count("linear_attention") * (conv + state) + (3 * state if "linear_attention" in types else 0)

    # --- what is not modelled -----------------------------------------------------------

    def memory_gap(self, spec, setup):
        """The setups whose every phase was checked within 1 % (tests/test_qwen3_5.py), all in bf16 with
        sdpa on one device without checkpointing, a cache or sharding, under the torch fallbacks of the
        delta rule and the convolution (no flash-linear-attention or causal-conv1d kernels, whose saved
        tensors differ): against the CUDA sim full training (with or without checkpointing), LoRA on
        all-linear, eval and inference (prefill and decode); against a real CPU step full training. The rest
        is refused in one sentence: eval with a cache, LoRA on named targets (which leave some layers'
        mixers without a trainable input), LoRA with checkpointing, fp32 (measured with the refusal lifted:
        full -2.59 %) and fp16, eager, QLoRA, sharding and TRL trainers."""
        plain = setup.sharding.value == "none" and setup.trainer.value == "hf" and setup.loop.value == "trainer"
        if setup.mode is Mode.FULL and plain and setup.device is Device.CUDA and setup.precision.value == "bf16" \
                and setup.attn is Attention.SDPA and not setup.use_cache:
            return ""
        if setup.mode is Mode.FULL and plain and setup.device is Device.CPU and setup.precision.value == "bf16" \
                and setup.attn is Attention.SDPA and not setup.grad_ckpt and not setup.use_cache:
            return ""
        every = tuple(t.lower() for t in setup.lora_targets) in (("all-linear",), ("all_linear",))
        if setup.mode is Mode.LORA and every and plain and setup.device is Device.CUDA \
                and setup.precision.value == "bf16" and setup.attn is Attention.SDPA and not setup.grad_ckpt \
                and not setup.use_cache:
            return ""
        if (setup.mode is Mode.INFERENCE or setup.mode is Mode.EVAL and not setup.use_cache) and plain \
                and setup.device is Device.CUDA and setup.precision.value == "bf16" and setup.attn is Attention.SDPA:
            return ""
        return (f"{spec.name} (qwen3_5_text): its parameters are counted exactly, but its memory is not modelled "
                f"yet for this setup ({setup.mode.value}, {setup.precision.value}, {setup.attn.value}, "
                f"{setup.device.value}), only for full training, LoRA on all-linear, eval and inference in bf16 "
                f"with sdpa on one CUDA GPU without sharding (checkpointing: full training only; on the CPU: full "
                f"training without it); "
                f"measure it with `vramlab profile ... --backend sim`")


#: torch_chunk_gated_delta_rule's default chunk, which the layer does not override (modeling_qwen3_5.py:294,
#: :606-616)
CHUNK = 64


def linear_attention_saved(spec, setup) -> dict[str, int]:
    """Per token, what one Gated-DeltaNet token mixer saves for backward in full training, in a 16-bit
    model, under the torch fallbacks ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule``
    (modeling_qwen3_5.py:256-277, :287-426; the fla / causal-conv1d kernels would save their own, not
    modelled). Ks = value heads x key dim (q and k repeated to every value head, :324-326), V = value
    heads x value dim, D = conv_dim, S = the sequence padded to the 64-token chunk:

    - the conv's input (in_proj_qkv's output, D) and its output (D, s + K - 1 long), which SiLU saves
      before the slice's view is copied (:268-277);
    - beta's sigmoid output; the fp32 ``a + dt_bias`` softplus saves and the product saves (:593-595);
    - l2norm of the fp32 copies of q and k: each copy and its rsqrt per head (:280-284, :329-336);
    - the padded fp32 q (scaled), k, v and beta (``F.pad`` copies even at zero padding) that
      ``k_beta``, ``v_beta``, the matmuls and the decays read (:343-352);
    - five (heads, S, 64) fp32 chunk matrices: ``pairwise_decay``'s exp, the two matmul outputs its
      product saves, ``ut_system`` (saved by both triangular solves) and ``intra_chunk_attn`` (:365-373);
      three exps of the cumulated decay (:374, :396-397);
    - ``k_beta``, the solves' outputs ``new_values`` and ``k_cumdecay``, the decayed q and k (:385-397);
    - every chunk's recurrent state the scan reads (S / 64 of (heads, dk, dv) fp32) and its ``v_new``
      (:401-408);
    - Qwen3_5RMSNormGated (:211-220): the fp32 copy of the output and its rsqrt, the normed copy the
      weight reads, z's fp32 copy (SiLU's input), the weighted output and the SiLU's fp32 output; and
      out_proj's input (the gated result in the compute dtype).

    With the layers' weights frozen (LoRA on every linear: the adapters' fp32 input copies are the
    generic ``lora_adapters``), what only a weight's gradient reads is not saved: the softplus output
    (read for ``A_log``'s), the gated norm's normed copy and out_proj's input; the convolution saves
    its input whatever (``convolution_backward`` reads input and weight, tools/autograd/derivatives.yaml)."""
    m = _fields(spec)
    p, s, trainable = setup.precision.compute_bytes, setup.seq, setup.trains_layer_weights
    vh, dk, dv, kernel = m["linear_value_heads"], m["linear_key_dim"], m["linear_value_dim"], m["conv_kernel"]
    ks, v = vh * dk, vh * dv
    conv = 2 * m["linear_key_heads"] * dk + v
    padded = -(-s // CHUNK) * CHUNK
    seq = dict(
        gdn_conv=p * conv * s + p * conv * (s + kernel - 1),
        gdn_gates=p * vh * s + (2 if trainable else 1) * FP32 * vh * s,
        gdn_l2norm=2 * FP32 * (ks + vh) * s,
        gdn_padded=FP32 * (2 * ks + v + vh) * padded,
        gdn_chunks=5 * FP32 * vh * CHUNK * padded + 3 * FP32 * vh * padded,
        gdn_solved=FP32 * (ks + v + ks + 2 * ks) * padded,
        gdn_states=FP32 * (padded // CHUNK) * vh * dk * dv + FP32 * v * padded,
        gdn_norm=(3 * FP32 + (2 if trainable else 1) * p) * v * s + FP32 * vh * s,
        gdn_out_proj_input=p * v * s if trainable else 0)
    return {k: x // s for k, x in seq.items()}


def _state_bytes(spec, setup) -> tuple[int, int]:
    """One linear layer's cache: the conv state (b, conv_dim, K) in the compute dtype and the recurrent
    state (b, value heads, dk, dv) in fp32, the chunked rule's output dtype (cache_utils.py
    LinearAttentionLayer.lazy_initialization: ``zeros`` of the conv states' dtype, ``zeros_like`` of the
    recurrent state; torch_chunk_gated_delta_rule's state is fp32, modeling_qwen3_5.py:383-386)."""
    m = _fields(spec)
    conv = 2 * m["linear_key_heads"] * m["linear_key_dim"] + m["linear_value_heads"] * m["linear_value_dim"]
    b = setup.batch
    return (b * conv * m["conv_kernel"] * setup.precision.compute_bytes,
            b * FP32 * m["linear_value_heads"] * m["linear_key_dim"] * m["linear_value_dim"])


def linear_prefill_working(spec, setup) -> int:
    """A linear-attention layer's no-grad working set at its peak, beside the residual stream: in
    ``torch_chunk_gated_delta_rule`` (modeling_qwen3_5.py:393-397), while the decayed q (or k) is made,
    the padded fp32 q and k, the decayed q, v, k_beta, v_beta, the decayed k_beta, the solves' outputs
    and ``core_attn_out`` (6 x Ks + 4 x V fp32 a token), the three (heads, S, 64) chunk matrices
    (pairwise_decay, ut_system, intra_chunk_attn), the padded beta, decay and cumulated decay, and one
    recurrent state; the caller's SiLU-ed conv output (q, k, v are its views), z, a, b, beta (compute
    dtype) and g (fp32) (:570-595)."""
    m = _fields(spec)
    p, b, s = setup.precision.compute_bytes, setup.batch, setup.seq
    vh, dk, dv = m["linear_value_heads"], m["linear_key_dim"], m["linear_value_dim"]
    ks, v = vh * dk, vh * dv
    conv = 2 * m["linear_key_heads"] * dk + v
    padded = b * (-(-s // CHUNK) * CHUNK)
    chunk = FP32 * (6 * ks + 4 * v + 3 * vh * CHUNK + 3 * vh) * padded + FP32 * b * vh * dk * dv
    caller = (p * (conv + v + 3 * vh) + FP32 * vh) * b * s
    return chunk + caller


def _gate_saved(spec, setup) -> int:
    """Per token, the full-attention layer's output gate in full training (modeling_qwen3_5.py:779-815):
    ``attn_output * torch.sigmoid(gate)`` saves the sigmoid's output and the attention output's copy
    (:811), and o_proj the gated product; full training counts that copy as the generic o_proj input
    (kernels.attention_output_copied), LoRA (o_proj frozen, its adapter's input copy the generic
    ``lora_adapters``) as the mul's."""
    return 2 * setup.precision.compute_bytes * spec.q_dim


def _full_spec(spec):
    """The spec of a model whose every layer is one of ``spec``'s full-attention layers."""
    fields = tuple((k, tuple(range(spec.num_layers)) if k == "full_layers" else v) for k, v in spec.family_fields)
    return replace(spec, family_fields=fields, name=f"{spec.name}-full-layers")


ARCHS = (Qwen3_5Text(),)
