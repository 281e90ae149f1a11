"""Gemma 4 text (Gemma4ForCausalLM, ``gemma4_text``): Gemma 3's four norms per layer, per-head
q/k norms and sliding layers, with full-attention layers of their own head size and key/value
heads, a weightless value norm, keys doubling as values on the full layers
(``attention_k_eq_v``), and options this module counts but whose memory it does not model yet:
per-layer input embeddings (PLE), layers reusing an earlier layer's keys and values
(``num_kv_shared_layers``, with ``use_double_wide_mlp``) and an MoE block beside the MLP.

Sources (transformers 5.24, models/gemma4/):

- configuration_gemma4.py:150-181 the fields and defaults (vocab 262144, hidden 2304,
  intermediate 9216, 30 layers, 8 heads, 4 key/value heads, head_dim 256, ``gelu_pytorch_tanh``,
  ``tie_word_embeddings`` True, ``sliding_window`` 512, ``hidden_size_per_layer_input`` 256,
  ``vocab_size_per_layer_input`` 262144); :184-186 ``use_bidirectional_attention == "all"``
  (not causal); :188-199 layer_types default to every 6th layer full, the last forced full;
  :208-221 ``global_head_dim`` (512) and ``num_global_key_value_heads`` (only with
  ``attention_k_eq_v``) become the full layers' ``per_layer_config``; :225-251 kv_sharing_modes
  (the last ``num_kv_shared_layers`` layers reuse ``"reuse"``).
- modeling_gemma4.py:196-214 Gemma4RMSNorm: ``normed * weight.float()`` then ``type_as`` (the
  fp32 normed input saved for the weight's gradient, Norm.RMS_WEIGHT_FP32) and
  ``x * torch.pow(mean_squared, -0.5)``: pow saves its input and the product its output, one fp32
  per row more than rsqrt; ``with_scale=False`` holds no weight.
- :1051-1067 Gemma4TextMLP (gate/up/down, doubled intermediate on kv-shared layers with
  ``use_double_wide_mlp``); :1141-1252 Gemma4TextAttention: q_proj, q_norm, and unless kv-shared
  k_norm, v_norm (no weight), k_proj, v_proj (none on full layers with ``attention_k_eq_v``: the
  k_proj output is the value, :1218), o_proj, all biased with ``attention_bias``; scaling 1.0;
  q/k/v normed on the (b, s, heads, d) views, rotated, then transposed (:1200-1222), as Gemma 3.
- :1255-1328 Gemma4TextExperts (fused (E, 2f, h) / (E, h, f)), Gemma4TextRouter (a weightless
  norm, ``proj`` an nn.Linear (h, E), ``scale`` (h) and ``per_expert_scale`` (E)); :1331-1418
  Gemma4TextDecoderLayer: four norms, PLE's per_layer_input_gate (h -> p), per_layer_projection
  (p -> h) and post_per_layer_input_norm, the MoE's router, experts and three more norms.
- :1544-1587 Gemma4TextModel: the scaled embedding, with PLE ``embed_tokens_per_layer``
  (V_ple, L x p), ``per_layer_model_projection`` (h -> L x p) and ``per_layer_projection_norm``
  (p); :1853-1920 Gemma4ForCausalLM, the tied head, ``final_logit_softcapping``.

A model's layers are of up to four kinds (sliding or full, computing or reusing keys and
values): the inventory holds the first layer's kind as the repeated one and the rest as
:attr:`~estimator.archs.base.Inventory.other`. The ModelSpec's head_dim and key/value heads are
the sliding layers'; the full layers' memory terms are the generic ones at their own sizes
(:func:`_full_spec`). :meth:`Gemma4Text.memory_gap` lets through only what was checked within
1 % (tests/test_gemma4.py).
"""
from __future__ import annotations

from dataclasses import replace

from ..configcheck import (
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_VOCAB,
    ConfigError,
    Limit,
)
from ..setup import Attention, Device, Mode
from ..units import FP32
from .base import LAYER_TYPES, LayerKinds, Linear, Norm, QKNorm, Tensor
from .gemma3 import Gemma3Text

#: Gemma4TextConfig's defaults (configuration_gemma4.py:150-181)
_DEFAULTS = dict(head_dim=256, hidden_activation="gelu_pytorch_tanh", sliding_window=512, global_head_dim=512,
                 hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144)
#: 0 is allowed for the sizes that switch a part off (PLE, kv sharing)
_ZERO_OK = Limit(MAX_LAYERS.name, 0, MAX_INTERMEDIATE.hi, MAX_INTERMEDIATE.why)
#: the (name, value) pairs kept in ModelSpec.family_fields
_FIELDS = ("global_head_dim", "global_kv_heads", "k_eq_v", "kv_shared", "double_wide", "ple", "ple_vocab", "moe",
           "moe_intermediate", "bidirectional", "full_layers", "only")


def _fields(spec) -> dict:
    return dict(spec.family_fields)


class Gemma4Text(LayerKinds, Gemma3Text):
    model_types = ("gemma4_text",)
    family = "gemma4"
    norm = Norm.RMS_WEIGHT_FP32
    qk_norm = QKNorm.HEAD
    switches = ()  # only transformers 5.24's layout is read
    # peft 0.21 has no default target_modules for gemma4_text (peft/utils/constants.py:99-102 lists
    # gemma3_text and the multimodal gemma4 only), and transformers maps no gemma4_text experts
    # onto a peft MoE layout (conversion_mapping.py): the fused experts stay unwrapped
    peft_targets = ()
    peft_maps_experts = False

    # --- reading the config ----------------------------------------------------------

    def read(self, f, model_type):
        config = f.config
        out = super().read(f, model_type)  # Gemma 3's: head_dim 256 when absent, as Gemma4TextConfig
        if "hidden_act" not in config and "hidden_activation" not in config:
            out["hidden_act"] = _DEFAULTS["hidden_activation"]
        if "per_layer_config" in config:
            raise ConfigError(f"{f.where}: per_layer_config is not read here; give the full layers' sizes as "
                              f"global_head_dim and num_global_key_value_heads (configuration_gemma4.py:208-221)")
        k_eq_v = f.bool("attention_k_eq_v", False)
        global_d = f.int("global_head_dim", limit=MAX_HEAD_DIM, default=_DEFAULTS["global_head_dim"])
        global_kv = f.int("num_global_key_value_heads", limit=MAX_HEADS, default=0)
        # the override applies only with attention_k_eq_v (configuration_gemma4.py:214)
        global_kv = global_kv if (k_eq_v and global_kv) else out["num_kv_heads"]
        if out["num_heads"] % global_kv:
            raise ConfigError(f"{f.where}: num_global_key_value_heads ({global_kv}) must divide "
                              f"num_attention_heads ({out['num_heads']}) (modeling_gemma4.py:1155)")
        layers = out["num_layers"]
        shared = f.int("num_kv_shared_layers", limit=Limit(MAX_LAYERS.name, 0, layers, "the layers"), default=0)
        ple = f.int("hidden_size_per_layer_input", limit=_ZERO_OK, default=_DEFAULTS["hidden_size_per_layer_input"])
        ple_vocab = f.int("vocab_size_per_layer_input", limit=MAX_VOCAB,
                          default=_DEFAULTS["vocab_size_per_layer_input"]) if ple else 0
        moe = f.bool("enable_moe_block", False)
        experts = top_k = moe_f = 0
        if moe:
            experts = f.int("num_experts", limit=MAX_EXPERTS)
            top_k = f.int("top_k_experts", limit=MAX_EXPERTS)
            moe_f = f.int("moe_intermediate_size", limit=MAX_INTERMEDIATE)
            if top_k > experts:
                raise ConfigError(f"{f.where}: top_k_experts ({top_k}) must be at most num_experts ({experts}) "
                                  f"(Gemma4TextRouter, modeling_gemma4.py:1316-1320)")
        bidirectional = config.get("use_bidirectional_attention")
        if bidirectional not in (None, "all", "vision"):
            raise ConfigError(f"{f.where}: use_bidirectional_attention must be null, \"all\" or \"vision\" "
                              f"(configuration_gemma4.py:172); got {bidirectional!r}")
        types = _layer_types(config, layers)
        # the full layers' indices: part of the spec's hash, as the config (and its layer_types) is not
        full_layers = tuple(i for i, t in enumerate(types) if t == "full_attention")
        ints = dict(full_layers=full_layers, global_head_dim=global_d, global_kv_heads=global_kv, k_eq_v=int(k_eq_v),
                    kv_shared=shared, double_wide=int(f.bool("use_double_wide_mlp", False)), ple=ple,
                    ple_vocab=ple_vocab, moe=int(moe), moe_intermediate=moe_f,
                    bidirectional=int(bidirectional == "all"), only=0)
        spec_fields = dict(out, num_experts=experts, experts_per_token=top_k, norms_per_layer=4,
                           o_bias=out["qkv_bias"], family_fields=tuple((k, ints[k]) for k in _FIELDS))
        if shared and shared < layers and set(types[:layers - shared]) != set(types):
            raise ConfigError(f"{f.where}: the layers before the last num_kv_shared_layers ({shared}) must hold every "
                              f"layer type the shared ones reuse (configuration_gemma4.py:237-241)")
        return spec_fields

    def layer_types(self, spec):
        if _fields(spec)["only"]:
            return ["full_attention"] * spec.num_layers
        return _layer_types(spec.config, spec.num_layers)

    def sliding_window(self, spec):
        return super().sliding_window(spec) if "sliding_window" in spec.config else _DEFAULTS["sliding_window"]

    def base_traits(self, spec):
        # no attention soft-capping in Gemma 4 (eager_attention_forward is called without softcap,
        # modeling_gemma4.py:1237-1247); the sliding layers' rotary tables are their own
        # (Gemma4TextRotaryEmbedding per layer type, :1070-1104)
        # and the full layers' tables are of their own head size (global_head_dim)
        m = _fields(spec)
        full = bool(m["full_layers"]) and not m["only"]
        return {"attn_softcap": False, "local_rotary": True,
                "global_rotary_dim": m["global_head_dim"] if full and m["global_head_dim"] != spec.head_dim else 0}

    # --- the inventory ------------------------------------------------------------------

    def _kinds(self, spec) -> list[tuple[tuple[str, bool], int]]:
        """Each layer kind (type, reuses keys and values) with its count, the first layer's first."""
        if _fields(spec)["only"]:
            return [(("full_attention", False), spec.num_layers)]
        types = _layer_types(spec.config, spec.num_layers)
        first_shared = spec.num_layers - _fields(spec)["kv_shared"]
        kinds = [(t, i >= first_shared) for i, t in enumerate(types)]
        counts: dict = {}
        for k in kinds:
            counts[k] = counts.get(k, 0) + 1
        return list(counts.items())

    def _kind_linears(self, spec, kind) -> list[Linear]:
        layer_type, reuse = kind
        m = _fields(spec)
        h, a, bias = spec.hidden_size, spec.num_heads, spec.qkv_bias
        full = layer_type == "full_attention"
        d, kv = (m["global_head_dim"], m["global_kv_heads"]) if full else (spec.head_dim, spec.num_kv_heads)
        out = [Linear("q_proj", "attention", h, a * d, bias)]
        if not reuse:
            out.append(Linear("k_proj", "attention", h, kv * d, bias))
            if not (full and m["k_eq_v"]):
                out.append(Linear("v_proj", "attention", h, kv * d, bias))
        out.append(Linear("o_proj", "attention", a * d, h, bias))
        f = spec.intermediate_size * (2 if m["double_wide"] and reuse else 1)
        out += [Linear("gate_proj", "mlp", h, f, False), Linear("up_proj", "mlp", h, f, False),
                Linear("down_proj", "mlp", f, h, False)]
        if m["ple"]:
            out += [Linear("per_layer_input_gate", "mlp", h, m["ple"], False),
                    Linear("per_layer_projection", "mlp", m["ple"], h, False)]
        if m["moe"]:
            e, mf = spec.num_experts, m["moe_intermediate"]
            out += [Linear("proj", "mlp", h, e, False),  # Gemma4TextRouter.proj: a plain nn.Linear
                    Linear("gate_up_proj", "mlp", h, 2 * mf, False, copies=e, fused_experts=True, parts=2),
                    Linear("down_proj", "mlp", mf, h, False, copies=e, fused_experts=True)]
        return out

    def _kind_norms(self, spec, kind) -> list[Tensor]:
        layer_type, reuse = kind
        m, h = _fields(spec), spec.hidden_size
        d = m["global_head_dim"] if layer_type == "full_attention" else spec.head_dim
        out = [Tensor("q_norm.weight", "norms", d, 1)] + ([] if reuse else [Tensor("k_norm.weight", "norms", d, 1)])
        out += [Tensor("norm.weight", "norms", h, 1)] * 4  # input, post_attention, pre/post_feedforward
        if m["ple"]:
            out.append(Tensor("post_per_layer_input_norm.weight", "norms", h, 1))
        if m["moe"]:
            out += [Tensor("router.scale", "mlp", h, 1), Tensor("router.per_expert_scale", "mlp", spec.num_experts, 1)]
            out += [Tensor("norm.weight", "norms", h, 1)] * 3  # post_feedforward_1/_2, pre_feedforward_2
        return out

    def root_tensors(self, spec):
        m = _fields(spec)
        if not m["ple"]:
            return []
        width = spec.num_layers * m["ple"]
        return [Tensor("embed_tokens_per_layer.weight", "embeddings", m["ple_vocab"], width),
                *self.root_linears(spec)[0].tensors(), Tensor("per_layer_projection_norm.weight", "norms", m["ple"], 1)]

    def root_linears(self, spec):
        # per_layer_model_projection (h -> L x p, modeling_gemma4.py:1573-1577): no norm and no
        # embedding by name, so the meta count's mlp group
        m = _fields(spec)
        return [Linear("per_layer_model_projection", "mlp", spec.hidden_size, spec.num_layers * m["ple"], False)] \
            if m["ple"] else []

    # --- the memory terms ---------------------------------------------------------------

    def kv_elems(self, spec) -> int:
        """Every layer's DynamicCache per token: a key and a value at its own kv heads x head_dim
        (the full layers' keys and values are both cached with attention_k_eq_v, :1218-1228)."""
        return sum(n * 2 * kv_dim for (t, _), n, kv_dim in self._kv_dims(spec))

    def _kv_dims(self, spec):
        m = _fields(spec)
        for kind, n in self._kinds(spec):
            full = kind[0] == "full_attention"
            yield kind, n, (m["global_kv_heads"] * m["global_head_dim"] if full else spec.kv_dim)

    def _norm_extra(self, spec) -> int:
        """Per token, the one fp32 per row each Gemma4RMSNorm keeps beyond rsqrt's (pow saves its
        input, the product its output, :207-209): the four layer norms, q_norm per head, k_norm
        per key/value head; and the weightless v_norm: its fp32 copy and its two fp32 per head."""
        kv = spec.num_kv_heads
        return FP32 * (4 + spec.num_heads + kv) + FP32 * (spec.kv_dim + 2 * kv)

    def saved_quirk(self, spec, setup, terms):
        """The generic terms of a Gemma 3 layer at the repeated layer's sizes, the norms' pow and
        v_norm (:meth:`_norm_extra`); the full layers' difference from them is
        :meth:`other_layers_saved`."""
        return dict(terms, gemma4_norms=self._norm_extra(spec)), 0, 0

    def other_layers_saved(self, spec, setup, terms):
        """Per token, what the layers of the other kinds save beyond the repeated layer's ``terms``
        (the full layers: the generic terms at their head size and key/value heads, :func:`_full_spec`)."""
        if _fields(spec)["only"]:
            return 0
        from ..activations import _training_activations_b1  # activations reads the registry
        own, T = sum(terms.values()), setup.batch * setup.seq
        full = _full_spec(spec)
        other = _training_activations_b1(full, _full_setup(full, setup)).layer_bytes // T
        return sum(n * (other - own) for _, n in self._kinds(spec)[1:])

    def prefill_quirk(self, spec, setup, tr, resid, mlp, attn, softmax, math):
        """The no-grad prefill's largest layer: beside the generic attention, q_norm's working set
        (the q_proj output, its fp32 copy and the squares, then the fp32 normed and weighted
        products: Gemma4RMSNorm, :204-214), and the full layers' at their own sizes (their keys and
        values repeated to every head past head_dim 256, kernels.kv_repeated)."""
        T = setup.batch * setup.seq
        attn = max(attn, (setup.precision.compute_bytes + 2 * FP32) * spec.q_dim * T)
        if _fields(spec)["only"] or len(self._kinds(spec)) == 1:
            return resid, mlp, attn
        from ..estimate import prefill_transient  # estimate reads the registry
        return resid, mlp, max(attn, prefill_transient(_full_spec(spec), setup) - resid)

    # --- what is not modelled -----------------------------------------------------------

    def memory_gap(self, spec, setup):
        """The setups whose every phase was checked within 1 % (tests/test_gemma4.py): the dense
        variant the 31B uses (no PLE, no kv sharing, no MoE, causal) on one device. Against the CUDA
        sim: bf16 or fp16, sdpa or eager, full training and LoRA on q/k/v/o and the MLP (or fewer of
        those) or all-linear, with or without checkpointing, inference and eval (with or without a
        cache) without it; against real CPU steps: full training and LoRA on those, bf16 sdpa. The rest
        is refused in one sentence (measured with the refusal lifted: fp32 full +2.41 %, LoRA +5.03 %;
        QLoRA nf4 +7.63 %)."""
        m = _fields(spec)
        parts = [name for name, on in (("per-layer input embeddings", m["ple"]),
                                       ("kv-shared layers", m["kv_shared"]), ("its MoE block", m["moe"]),
                                       ("bidirectional attention", m["bidirectional"])) if on]
        if parts:
            return (f"{spec.name} (gemma4_text): its parameters are counted exactly, but the memory of "
                    f"{' and '.join(parts)} is not modelled yet; measure it with `vramlab profile ... --backend sim`")
        targets = set(setup.lora_targets)
        named = targets <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        every = tuple(t.lower() for t in setup.lora_targets) in (("all-linear",), ("all_linear",))
        plain = setup.sharding.value == "none" and setup.trainer.value == "hf" and setup.loop.value == "trainer"
        cuda = setup.device is Device.CUDA and setup.precision.value in ("bf16", "fp16") and plain \
            and setup.attn in (Attention.SDPA, Attention.EAGER) and (
                (setup.mode is Mode.FULL or setup.mode is Mode.LORA and (named or every)) and not setup.use_cache
                or setup.mode in (Mode.INFERENCE, Mode.EVAL) and not setup.grad_ckpt)
        cpu = setup.device is Device.CPU and setup.precision.value == "bf16" and plain \
            and setup.attn is Attention.SDPA and not setup.grad_ckpt and not setup.use_cache \
            and (setup.mode is Mode.FULL or setup.mode is Mode.LORA and named)
        if cuda or cpu:
            return ""
        return (f"{spec.name} (gemma4_text): its parameters are counted exactly, but its memory is not modelled yet "
                f"for this setup ({setup.mode.value}, {setup.precision.value}, {setup.attn.value}, "
                f"{setup.device.value}), only for full training and LoRA on q/k/v/o and the MLP or all-linear, "
                f"inference and eval, in bf16 or fp16 with sdpa or eager on one CUDA GPU without sharding (on the "
                f"CPU: full training and LoRA on those, bf16 sdpa); measure it with "
                f"`vramlab profile ... --backend sim`")


def _layer_types(config, layers: int) -> list[str]:
    """The config's layer_types, else every 6th layer full; the last layer is forced full
    (configuration_gemma4.py:188-199)."""
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == layers and all(t in LAYER_TYPES for t in types):
        types = list(types)
    else:
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    if types:
        types[-1] = "full_attention"
    return types


def _full_spec(spec):
    """The spec of a model whose every layer is one of ``spec``'s full-attention layers: their head
    size and key/value heads, the family field ``only`` set (no other layer kinds, no sliding)."""
    m = _fields(spec)
    fields = tuple((k, 1 if k == "only" else v) for k, v in spec.family_fields)
    return replace(spec, head_dim=m["global_head_dim"], num_kv_heads=m["global_kv_heads"], family_fields=fields,
                   name=f"{spec.name}-full-layers")


def _full_setup(full, setup):
    """``setup`` with the LoRA targets the full layers hold (no v_proj with attention_k_eq_v)."""
    if setup.mode not in (Mode.LORA, Mode.QLORA):
        return setup
    names = {lin.name for lin in Gemma4Text().linears(full)}
    kept = tuple(t for t in setup.lora_targets if t in names or t.lower() in ("all-linear", "all_linear"))
    return replace(setup, lora_targets=kept) if kept != tuple(setup.lora_targets) else setup


ARCHS = (Gemma4Text(),)
