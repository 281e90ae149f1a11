"""What the estimator knows about an architecture, as data: the base every family module fills.

A family module (``estimator/archs/<family>.py``) holds everything about one family of
transformers models, with its sources:

- how its ``config.json`` is read (:meth:`Arch.read`: field names and defaults of the
  configuration class in ``transformers/models/<type>/configuration_<type>.py``);
- ONE inventory of its parameter tensors (:meth:`Arch.linears`, :meth:`Arch.layer_norms`,
  :meth:`Arch.final_norms`, and the embeddings the spec describes), from which the
  parameter counts, the per-tensor sizes and the sharding shapes all derive
  (:func:`inventory`);
- its traits (:class:`Traits`, documented str-Enums and flags): what the memory terms read,
  never a ``model_type``;
- its version switches (:class:`Switch`: a trait a library release changed, with the file
  and line it was read from);
- hooks for the few quirks no trait describes (:meth:`Arch.buffer_bytes`,
  :meth:`Arch.prefill_quirk`), each documented where it is.

Pure Python: no torch, no transformers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from functools import lru_cache
from typing import Any, ClassVar

from ..configcheck import MAX_HIDDEN, MAX_POSITIONS, ConfigError, Fields


class _Doc(str, Enum):
    """A closed set of values; each member's comment says what it means for memory."""

    def __str__(self) -> str:
        return self.value


class QKV(_Doc):
    """How one layer's query, key and value come out of its projections."""

    #: q_proj, k_proj, v_proj: three tensors of their own (Llama, OPT, BioGPT)
    SEPARATE = "separate"
    #: one projection whose q, k and v are views, no rotary embedding (GPT-2's c_attn): what
    #: keeps one view keeps the whole projection output
    FUSED_VIEWS = "fused-views"
    #: one projection, q and k rotated into new tensors, v a view of it (Phi-3's qkv_proj,
    #: GPT-NeoX's query_key_value)
    FUSED_ROTATED = "fused-rotated"


class MLP(_Doc):
    """What the MLP block saves for backward (per token, f = intermediate size)."""

    #: act(gate) * up -> down (SwiGLU, GeGLU): gate, act(gate), up and the product
    GATED = "gated"
    #: the same with one gate_up projection whose halves are views (Phi-3's gate_up_proj)
    GATED_FUSED = "gated-fused"
    #: NewGELUActivation, a Python formula (transformers activations.py ``gelu_new``): x,
    #: tanh(.), 0.5*x and 1+tanh(.)
    NEW_GELU = "new-gelu"
    #: F.gelu (``gelu``): its input; the output projection saves its output
    GELU = "gelu"
    #: ReLU and activations taken like it: its output, which the output projection saves too
    RELU = "relu"
    #: gpt-oss's experts (GptOssExperts._apply_gate): interleaved gate/up views of the gate_up
    #: output, both clamped (each clamp saves the whole output it views), ``gate *
    #: sigmoid(gate * alpha)`` and ``(up + 1) * glu``: the gate_up output (2f), the clamped gate,
    #: the sigmoid, up + 1 and glu (f each); the down projection saves the product
    CLAMPED_SWIGLU = "clamped-swiglu"


class Router(_Doc):
    """How an MoE router turns its logits into routing weights (what it saves per token)."""

    #: ``softmax(logits, dtype=float32)`` over every expert, then top-k (Mixtral, Qwen3-MoE): the
    #: fp32 probabilities (T, E) are saved
    SOFTMAX_TOPK = "softmax-topk"
    #: top-k of the logits, then a softmax over the k values in the logits' dtype (gpt-oss's
    #: GptOssTopKRouter): the logits are freed, the (T, k) indices and weights are saved
    TOPK_SOFTMAX = "topk-softmax"
    #: the logits copied to fp32 (``.float()``), top-k of them, a softmax over the k fp32 values
    #: cast back to the compute dtype (5.24 models/granitemoe/modeling_granitemoe.py:128-131):
    #: the (T, k) indices and the fp32 softmax output are saved, the logits freed
    TOPK_SOFTMAX_FP32 = "topk-softmax-fp32"


class Norm(_Doc):
    """The normalisation layer and what it saves."""

    #: LlamaRMSNorm: x.to(fp32) (a copy unless fp32), an fp32 rsqrt per token, and
    #: ``weight * x.to(dtype)`` saves x.to(dtype) when the weight is trainable
    RMS = "rms"
    #: GemmaRMSNorm: ``(1 + weight)`` in fp32, so the normed copy it saves is fp32
    RMS_ONE_PLUS = "rms-one-plus"
    #: OLMo 2's RMSNorm: ``(weight * x_normed).to(dtype)``, the fp32 normed input saved for the
    #: weight's gradient (as Gemma's form)
    RMS_WEIGHT_FP32 = "rms-weight-fp32"
    #: nn.LayerNorm (native_layer_norm): its input, an fp32 mean and rstd per token
    LAYER = "layer"


class QKNorm(_Doc):
    """A norm on the projected queries and keys, before the rotary embedding."""

    #: none (Llama, Mistral, Qwen2, ...)
    NONE = "none"
    #: over each head's head_dim (Qwen3 ``q_norm``/``k_norm`` of (head_dim,), Gemma 3): one
    #: fp32 rsqrt per head and token
    HEAD = "head"
    #: over all heads at once (OLMo 2: (heads * head_dim,) weights): one rsqrt per token
    FULL = "full"


class Softmax(_Doc):
    """The dtype of eager attention's softmax."""

    #: ``softmax(dtype=torch.float32).to(query.dtype)``: an fp32 output and its cast copy
    UPCAST = "upcast"
    #: in the compute dtype (GPT-2, BioGPT, GPT-NeoX's own attention before 4.49)
    COMPUTE = "compute"


@dataclass(frozen=True)
class Linear:
    """A weight matrix of one decoder layer (``in_features -> out_features``)."""

    name: str  # the module's own name, as LoRA targets name it (q_proj, c_attn, fc1, ...)
    group: str
    in_features: int
    out_features: int
    bias: bool
    copies: int = 1  # MoE experts: one slice per expert
    fused_experts: bool = False  # one 3-D parameter, not an nn.Linear: no LoRA, no bitsandbytes
    conv1d: bool = False  # GPT-2's Conv1D stores its weight (in, out), nn.Linear (out, in)
    parts: int = 1  # projections concatenated in one fused expert parameter (gate_up_proj: 2)
    router: bool = False  # an MoE router: nn.Linear in transformers 4.x, a module of its own class in 5.x

    def lora_rank_multiplier(self) -> int:
        """peft (0.21) wraps fused MoE expert parameters under all-linear with a rank of
        r * E (``ParamWrapper``), doubled for the concatenated gate_up projection."""
        return self.copies * self.parts if self.fused_experts else 1

    @property
    def params(self) -> int:
        return self.copies * (self.in_features * self.out_features + (self.out_features if self.bias else 0))

    def tensors(self) -> tuple[Tensor, ...]:
        """Its weight (and bias) as FSDP2 chunks them on dim 0 (rows, the other dims)."""
        if self.copies > 1:
            weight = Tensor(f"{self.name}.weight", self.group, self.copies, self.in_features * self.out_features)
        elif self.conv1d:
            weight = Tensor(f"{self.name}.weight", self.group, self.in_features, self.out_features)
        else:
            weight = Tensor(f"{self.name}.weight", self.group, self.out_features, self.in_features)
        if not self.bias:
            return (weight,)
        if self.copies > 1:
            return weight, Tensor(f"{self.name}.bias", self.group, self.copies, self.out_features)
        return weight, Tensor(f"{self.name}.bias", self.group, self.out_features, 1)


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor: its name, its parameter group and its (rows, columns) as FSDP2
    chunks it on dim 0 (``FSDPParam._init_sharded_param``; the other dims flattened)."""

    name: str
    group: str  # embeddings, attention, mlp, norms, lm_head
    rows: int
    cols: int = 1

    @property
    def elems(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class Inventory:
    """Every parameter tensor of a model, once (a tied head counted with the embeddings), in
    ``model.parameters()`` groups: the root's tensors before the layers (embeddings), one
    decoder layer's, and the root's after them (final norms, an untied head)."""

    embeddings: tuple[Tensor, ...]
    layer: tuple[Tensor, ...]
    final: tuple[Tensor, ...]
    layers: int
    #: the first ``dense_layers`` of the ``layers`` hold these tensors instead of ``layer``
    #: (DeepSeek-V3's ``first_k_dense_replace`` dense-MLP layers before its MoE ones);
    #: ``layer`` is then the repeated later layer, which ``layer_elems`` and ``dim0_shapes``
    #: describe (the memory terms, which read those, refuse such models: Arch.refuse)
    dense_layer: tuple[Tensor, ...] = ()
    dense_layers: int = 0
    #: further layers built otherwise than ``layer`` wherever they sit, each kind's tensors and
    #: how many layers hold them (Gemma 4's full-attention and kv-shared layers: Arch.other_layers);
    #: ``layer`` is then held by the rest, and the memory terms that read ``layer_elems`` and
    #: ``dim0_shapes`` alone (sharding) are refused for such models (Arch.memory_gap)
    other: tuple[tuple[tuple[Tensor, ...], int], ...] = ()

    @property
    def root(self) -> tuple[Tensor, ...]:
        """What ``fully_shard(model)`` owns beyond the decoder layers."""
        return self.embeddings + self.final

    @property
    def layer_elems(self) -> int:
        return sum(t.elems for t in self.layer)

    @property
    def total(self) -> int:
        return sum(t.elems for t in self.root) + sum(n * t.elems for t, n in self._layer_tensors())

    @property
    def repeated_layers(self) -> int:
        """How many layers hold ``layer``."""
        return self.layers - self.dense_layers - sum(n for _, n in self.other)

    def _layer_tensors(self) -> list[tuple[Tensor, int]]:
        """Every decoder-layer tensor with the number of layers holding it."""
        return [(t, self.dense_layers) for t in self.dense_layer] \
            + [(t, self.repeated_layers) for t in self.layer] + [(t, n) for ts, n in self.other for t in ts]

    def groups(self, names: tuple[str, ...]) -> dict[str, int]:
        out = dict.fromkeys(names, 0)
        for t in self.root:
            out[t.group] += t.elems
        for t, n in self._layer_tensors():
            out[t.group] += n * t.elems
        return out

    def sizes(self) -> tuple[int, ...]:
        """Element count of every tensor, embeddings, layers (in order), then the rest."""
        dense, layer = [t.elems for t in self.dense_layer], [t.elems for t in self.layer]
        other = [t.elems for ts, n in self.other for t in ts * n]
        return tuple([t.elems for t in self.embeddings] + dense * self.dense_layers
                     + layer * self.repeated_layers + other + [t.elems for t in self.final])

    def dim0_shapes(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """(rows, columns) of the root's tensors and of one layer's."""
        return tuple((t.rows, t.cols) for t in self.root), tuple((t.rows, t.cols) for t in self.layer)


@dataclass(frozen=True)
class Traits:
    """What the memory terms read about a model, resolved for the library versions assumed
    (:meth:`Arch.traits`). Printed by ``vramlab estimate --json`` (``assumed_versions.traits``)."""

    family: str  # the calibration group (overheads.calibration_key)
    qkv: QKV
    mlp: MLP
    norm: Norm
    eager_softmax: Softmax
    #: a norm on the projected queries and keys (its kind is ``qk_norm_kind``)
    qk_norm: QKNorm = QKNorm.NONE
    qk_norm_kind: Norm = Norm.RMS
    #: layers of type sliding_attention, and their window: from a sequence as long as the
    #: window, sdpa gets an explicit mask there (transformers masking_utils.py
    #: ``_ignore_causal_mask_sdpa``: ``kv_length >= local_attention_size`` keeps the mask)
    sliding_layers: int = 0
    sliding_window: int = 0
    #: the sliding layers rotate with tables of their own (Gemma 3's ``rope_local_base_freq``)
    local_rotary: bool = False
    #: the full-attention layers rotate with tables of their own head size (Gemma 4's
    #: ``global_head_dim``): their cos and sin, saved once whatever the batch (0: none)
    global_rotary_dim: int = 0
    #: tanh soft-capping of the attention scores (Gemma 2 ``attn_logit_softcapping``): its
    #: output is one more (heads, s, s) tensor saved in eager attention
    attn_softcap: bool = False
    #: eager attention clamps the masked scores with ``torch.max``, whose backward keeps its
    #: input (OPT before 4.49)
    eager_clamps_scores: bool = False
    #: the rotary tables are fp32, so a 16-bit model's rotated q and k are fp32 (GPT-NeoX < 4.45)
    rotary_fp32: bool = False
    #: attention and MLP both read the layer input: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX)
    parallel_residual: bool = False
    #: the layer's first norm reads its input (pre-LN); False: norms after the residual add
    pre_norm: bool = True
    #: a forward with ``use_cache`` returns attention's own key and value as a tuple per layer
    #: (no copies), not a ``DynamicCache`` that concatenates them into new tensors
    tuple_cache: bool = False
    #: the model's own attention hands sdpa the projection's views as they are, whatever the
    #: shared sdpa integration does (GPT-2's own attention classes before 4.48)
    sdpa_gets_views: bool = False
    #: the rotary embedding joins the rotated slice of q and k and the rest with ``torch.cat``
    #: (a partial rotary: GLM-4.5, 5.24 models/glm4_moe/modeling_glm4_moe.py:159-170, which cats
    #: even at ``partial_rotary_factor`` 1), so q reaches sdpa contiguous in (b, heads, s, d) rather
    #: than as the projection's transposed view, and the output flash lays out like it is copied
    #: back to (b, s, heads, d) before o_proj
    rotary_concat: bool = False
    #: a no-grad prefill computes every position's logits (no ``logits_to_keep``) ...
    prefill_full_logits: bool = False
    #: ... and copies them to fp32 (``logits = logits.float()``)
    prefill_logits_fp32: bool = False
    #: the causal-LM loss is the model's own cross-entropy in the logits' dtype, no fp32 upcast
    loss_in_compute_dtype: bool = False
    #: every attention layer registers a (positions, positions) bool causal mask and a scalar
    #: ``masked_bias`` as buffers
    causal_mask_buffers: bool = False
    #: every attention layer keeps rotary cos/sin tables for all positions, in the build dtype
    rotary_tables_per_layer: bool = False
    #: eager attention concatenates a learned per-head sink logit to the scores (gpt-oss):
    #: (heads, s, s + 1) scores, the max subtracted first (its int64 argmax saved), a softmax in
    #: the scores' dtype over s + 1 columns, the sink column dropped by a view
    attn_sinks: bool = False
    #: a decode step's cache keeps only a sliding layer's window (transformers 5.24
    #: cache_utils.py:242-249 DynamicSlidingWindowLayer.update: the last window - 1 tokens, a view
    #: of the concatenation; after the prefill the view keeps the whole prompt's storage until
    #: the first decode step replaces it). Set by the families checked against the sim on it
    #: (gpt_oss); the others still count every layer at the full length
    cache_keeps_window: bool = False
    #: how an MoE router makes its weights (MoE models only)
    router: Router = Router.SOFTMAX_TOPK
    #: eager attention's value matmul saves a view of the fused projection for a batch of one
    #: (the reshape to (b * heads, s, d) is a view only then), keeping the projection whole
    eager_value_view_b1: bool = False

    def to_dict(self) -> dict:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Enum) else v) for f in fields(self)}


@dataclass(frozen=True)
class Switch:
    """A trait a library release changed: ``value`` from release ``since`` on, ``before``
    in older ones, and where that was read (``cite``: the wheels' file and line)."""

    trait: str
    since: str
    value: Any
    before: Any
    cite: str
    library: str = "transformers"


class LayerKinds:
    """A mixin for an architecture whose layer kinds are data: ``_kinds(spec)`` gives (kind, count)
    pairs, the first the kind counted as the layer, and ``_kind_linears`` / ``_kind_norms`` each
    kind's inventory (gemma4_text's sliding and full layers, qwen3_5_text's linear-attention and
    full-attention layers); the other kinds are :meth:`Arch.other_layers`."""

    def linears(self, spec):
        return self._kind_linears(spec, self._kinds(spec)[0][0])

    def layer_norms(self, spec):
        return self._kind_norms(spec, self._kinds(spec)[0][0])

    def other_layers(self, spec):
        return [(self._kind_linears(spec, k), self._kind_norms(spec, k), n) for k, n in self._kinds(spec)[1:]]


class Arch:
    """One family: subclasses set the class attributes and override the methods they need.
    Every method takes the :class:`~estimator.modelspec.ModelSpec` the family read."""

    #: the config ``model_type`` values this family reads
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the calibration group (``overheads.calibration_key``)
    family: ClassVar[str] = ""
    #: ``tie_word_embeddings`` when a config.json omits it (the configuration class's default)
    tie_default: ClassVar[bool] = True
    #: what peft adapts under ``LoraConfig(target_modules=None)``
    #: (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21)
    peft_targets: ClassVar[tuple[str, ...]] = ("q_proj", "v_proj")
    #: the traits before any switch (:meth:`base_traits` may read the config on top)
    qkv: ClassVar[QKV] = QKV.SEPARATE
    qk_norm: ClassVar[QKNorm] = QKNorm.NONE
    norm: ClassVar[Norm] = Norm.LAYER
    eager_softmax: ClassVar[Softmax] = Softmax.UPCAST
    #: the version switches, oldest behaviour in ``before``
    switches: ClassVar[tuple[Switch, ...]] = ()
    #: whether the estimator has a formula for this family (the fallback has none)
    exact: ClassVar[bool] = True
    #: peft (0.21) maps the transformers-4 names of fused MoE experts and the router onto the
    #: transformers-5 parameters (``gate_proj``/``up_proj``/``down_proj``, ``all-linear``), for
    #: model types transformers' conversion mapping lists (peft/utils/transformers_weight_conversion.py
    #: ``_MOE_TARGET_MODULE_MAPPING``: mixtral, qwen2_moe and the types mapped onto them, e.g. qwen3_moe)
    peft_maps_experts: ClassVar[bool] = True
    #: the transformers-4 module names peft (0.21) turns into target parameters of fused experts
    #: and the router (peft/utils/transformers_weight_conversion.py:332-345 ``_MOE_TARGET_MODULE_MAPPING``,
    #: applied at :444-456), for the families whose layers also hold nn.Linear modules of those
    #: names (dense or shared-expert MLPs): a name mapped here is dropped from ``target_modules``,
    #: so those nn.Linear modules are never wrapped, under ``all-linear`` too (:370-374). Empty:
    #: the older rule of :func:`estimator.params.lora_targets` (no such modules)
    peft_moe_names: ClassVar[Mapping[str, str]] = {}
    #: the routing weights an MoE router hands its experts stay fp32 (Mixtral's softmax of the fp32
    #: logits, never cast back), so the experts' ``proj_out * sample_weights_g`` is fp32 (S, h);
    #: False: cast to the compute dtype first (Qwen3-MoE, GraniteMoe) or computed in it (gpt-oss)
    routing_weights_fp32: ClassVar[bool] = False
    #: what :meth:`checkpoint_note` says of a published checkpoint's own quantization
    checkpoint_detail: ClassVar[str] = ("an MXFP4 checkpoint trains dequantized to bf16; MXFP4 inference kernels "
                                        "would hold less")

    # --- reading the config ----------------------------------------------------------

    def read(self, f: Fields, model_type: str) -> dict[str, Any]:
        """The ModelSpec fields (all but name, model_type, tie_word_embeddings, source,
        config, ignored_keys) read from the config through ``f``."""
        raise NotImplementedError

    # --- the one inventory of parameter tensors ----------------------------------------

    def linears(self, spec) -> list[Linear]:
        """The matrices of one decoder layer, in ``named_parameters()`` order."""
        raise NotImplementedError

    def layer_norms(self, spec) -> list[Tensor]:
        """One decoder layer's norm tensors (after its linears, as the counts list them)."""
        return _norm_tensors(spec) * spec.norms_per_layer

    def final_norms(self, spec) -> int:
        """Norms after the last layer."""
        return 1

    def root_tensors(self, spec) -> list[Tensor]:
        """The root's own tensors beside the embeddings the spec describes (none here; Gemma 4's
        per-layer input embeddings), its :meth:`root_linears` among them."""
        return []

    def root_linears(self, spec) -> list[Linear]:
        """The root's nn.Linear modules beside the layers' and the head (none here; Gemma 4's
        ``per_layer_model_projection``): bitsandbytes quantizes them, peft's all-linear wraps them."""
        return []

    def dense_layers(self, spec) -> int:
        """How many of the first layers are built otherwise than :meth:`linears` says (0: none)."""
        return 0

    def dense_linears(self, spec) -> list[Linear]:
        """The matrices of those first layers (their norms are :meth:`layer_norms`)."""
        return []

    def other_layers(self, spec) -> list[tuple[list[Linear], list[Tensor], int]]:
        """Layers of further kinds, wherever they sit: each kind's matrices, its norm tensors and
        how many layers are of it (none here; :attr:`Inventory.other`)."""
        return []

    # --- traits -----------------------------------------------------------------------

    def mlp_kind(self, spec) -> MLP:
        """Gated MLPs by the spec; the rest by ``hidden_act`` (transformers activations.py)."""
        if spec.gated_mlp:
            return MLP.GATED
        # gelu_pytorch_tanh is F.gelu(x, approximate="tanh") (transformers activations.py
        # PytorchGELUTanh): one op saving its input, as exact GELU
        kinds = {"gelu_new": MLP.NEW_GELU, "gelu": MLP.GELU, "gelu_pytorch_tanh": MLP.GELU}
        return kinds.get(spec.hidden_act, MLP.RELU)

    def base_traits(self, spec) -> dict[str, Any]:
        """Traits that depend on the config rather than on versions (override to add)."""
        return {}

    def layer_types(self, spec) -> list[str]:
        """Each layer's attention type, ``sliding_attention`` or ``full_attention``: the config's
        ``layer_types`` where it lists them (checked by :func:`check_layer_types`), else the
        configuration class's default (override: all full here)."""
        types = spec.config.get("layer_types")
        return list(types) if isinstance(types, list) else ["full_attention"] * spec.num_layers

    def position_limit(self, spec, rope_factor: float) -> tuple[int, str]:
        """The longest sequence the model takes, and why. Learned position tables stop at their
        rows; rotary positions are computed for any position, and a config's ``rope_scaling``
        (or ``rope_parameters``) ``factor`` -- or ``--rope-scaling FACTOR`` -- stretches the
        trained ``max_position_embeddings`` by it (transformers modeling_rope_utils.py: linear,
        dynamic, yarn and llama3 all scale by ``factor``)."""
        if not spec.max_positions:
            return 0, ""
        if spec.learned_positions:
            return spec.max_positions, "its learned position table"
        factor = rope_factor or _config_rope_factor(spec.config)
        if factor and factor > 1:
            return int(spec.max_positions * factor), f"max_position_embeddings x rope scaling {factor:g}"
        return spec.max_positions, "max_position_embeddings (no rope scaling; pass --rope-scaling FACTOR)"

    def sliding_window(self, spec) -> int:
        """The sliding window of the sliding_attention layers (0: none)."""
        window = spec.config.get("sliding_window")
        return window if isinstance(window, int) and not isinstance(window, bool) else 0

    def traits(self, spec, semantics) -> Traits:
        """The traits of ``spec`` under ``semantics`` (estimator/versions.py): the family's
        defaults, what the config sets, then every switch for the assumed versions."""
        return _resolve(self, spec, semantics)

    def checkpoint_note(self, spec) -> str:
        """What the estimate assumes of a config's own ``quantization_config`` (gpt-oss's MXFP4
        experts): nothing of it is modelled; every weight is counted in the setup's precision, as
        training dequantizes an MXFP4 checkpoint to bf16 (transformers 5.24
        quantizers/quantizer_mxfp4.py:208-213, ``Mxfp4Config(dequantize=True)``), and bitsandbytes
        quantization comes from --quant only ("" without one)."""
        qc = spec.config.get("quantization_config")
        if not isinstance(qc, Mapping):
            return ""
        return (f"the config's quantization_config ({qc.get('quant_method', '?')}) is not modelled: weights are "
                f"counted in the setup's precision ({self.checkpoint_detail}); use --quant for bitsandbytes")

    def refuse(self, spec, setup) -> str:
        """A sentence why this family cannot run ``setup`` as transformers builds it ("" when it can)."""
        return ""

    def memory_gap(self, spec, setup) -> str:
        """A sentence naming the memory terms of this family the estimator does not have yet for
        ``setup`` ("" when it has them all): such an estimate is refused with it
        (estimate.NotModelled), and the profiler measures it without an estimate beside it."""
        return ""

    # --- quirk hooks ------------------------------------------------------------------

    def buffer_bytes(self, spec, tr: Traits, param_bytes: int) -> int:
        """Non-parameter buffers that take memory, from the traits: per-layer causal-mask
        buffers (bool, positions squared, and ``masked_bias`` in the build dtype) and
        per-layer rotary cos/sin tables (two (positions, head_dim) tensors in the build dtype)."""
        if tr.causal_mask_buffers:
            return spec.num_layers * (spec.max_positions ** 2 + param_bytes)
        if tr.rotary_tables_per_layer:
            return spec.num_layers * 2 * spec.max_positions * spec.head_dim * param_bytes
        return 0

    def saved_quirk(self, spec, setup, terms: dict[str, int]) -> tuple[dict[str, int], int, int]:
        """A family's own per-token saved terms of one training layer (activations.py
        ``_training_activations_b1``), where no trait says them: the repeated layer's terms, what a
        dense layer (:meth:`dense_layers`) saves per token beyond it (negative: less), and a correction
        once per model (the layers before the first adapter, which save less). ``terms``: the generic
        terms, keyed as activations.py names them."""
        return terms, 0, 0

    def recomputed_quirk(self, spec, setup, generic: int) -> int:
        """Bytes per token a checkpointed layer's recomputation holds beyond what the layer saves, at
        the moment it stops (activations.checkpointed_activations; ``generic``: the grouped_mm MoE
        experts' locals there, :func:`estimator.activations.recomputed_moe_locals`). A family whose
        layer ends otherwise returns its own."""
        return generic

    def recomputed_experts_backward(self, spec, setup) -> tuple[int, int, int] | None:
        """Where a checkpointed MoE layer's recomputation stops after its routed experts returned (a
        shared expert runs after them), the peak can sit later, in that layer's backward of the
        experts' routing-weight product: ``(elements, freed, working)``, the layer's parameters whose
        gradients exist by then (full training), the per-token bytes of its recomputed saved tensors
        freed by then and the per-token bytes that backward holds beside them (estimate._training_phases).
        ``None``: no such moment (the generic recomputed layer, :meth:`recomputed_quirk`, covers it)."""
        return None

    def decode_working(self, spec, setup, tokens: int) -> int:
        """Bytes a decode step's attention holds beside the cache, over ``tokens`` cached positions,
        where the family makes more than the generic terms say (0: none; estimate._inference_phases)."""
        return 0

    def other_layers_saved(self, spec, setup, terms: dict[str, int]) -> int:
        """Per token, what the layers of :meth:`other_layers`' kinds save in training beyond the
        repeated layer's ``terms`` (activations.py ``_training_activations_b1``; 0: none)."""
        return 0

    def kv_elems(self, spec) -> int:
        """Elements every layer's DynamicCache holds per token (:meth:`kv_elems_per_token` per
        layer, unless the family's layers differ)."""
        return spec.num_layers * self.kv_elems_per_token(spec)

    def kv_elems_per_token(self, spec) -> int:
        """Elements one layer's DynamicCache holds per token: a key and a value of ``kv_dim``
        (cache_utils.py DynamicLayer.update), unless the family caches something else."""
        return 2 * spec.kv_dim

    def prefill_quirk(self, spec, setup, tr: Traits, resid: int, mlp: int, attn: int, softmax: int,
                      math: bool) -> tuple[int, int, int]:
        """A family's own terms of the no-grad prefill's layer working set (residual stream,
        MLP, attention core, bytes; estimate.prefill_transient), where no trait says them.
        ``softmax``: bytes per score element of eager's scores and softmax together; ``math``:
        sdpa runs its math kernel."""
        return resid, mlp, attn


def fused_expert_linears(spec, biased: bool) -> list[Linear]:
    """q/k/v/o_proj (biased as the spec says), the router's (E, h) weight and the fused expert stacks
    gate_up_proj (E, 2f, h) and down_proj (E, h, f) of transformers 5's ``@use_experts_implementation``
    experts; ``biased``: the router and the experts carry biases (gpt-oss) or not (GraniteMoe). Each
    family cites its own modeling lines."""
    h, f, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
    q, kv, bias = spec.q_dim, spec.kv_dim, spec.qkv_bias
    return [Linear("q_proj", "attention", h, q, bias), Linear("k_proj", "attention", h, kv, bias),
            Linear("v_proj", "attention", h, kv, bias), Linear("o_proj", "attention", q, h, spec.o_bias),
            Linear("router", "mlp", h, e, biased, router=True),
            Linear("gate_up_proj", "mlp", h, 2 * f, biased, copies=e, fused_experts=True, parts=2),
            Linear("down_proj", "mlp", f, h, biased, copies=e, fused_experts=True)]


def _norm_tensors(spec) -> list[Tensor]:
    """One norm: RMSNorm's weight (h); LayerNorm's weight and bias."""
    h = spec.hidden_size
    weight = Tensor("norm.weight", "norms", h, 1)
    return [weight] if spec.norm == "rmsnorm" else [weight, Tensor("norm.bias", "norms", h, 1)]


@lru_cache(maxsize=512)
def _resolve(arch: Arch, spec, semantics) -> Traits:
    values: dict[str, Any] = dict(family=arch.family, qkv=arch.qkv, mlp=arch.mlp_kind(spec), norm=arch.norm,
                                  eager_softmax=arch.eager_softmax, qk_norm=arch.qk_norm, qk_norm_kind=arch.norm)
    window = arch.sliding_window(spec)
    sliding = sum(t == "sliding_attention" for t in arch.layer_types(spec)) if window else 0
    values.update(sliding_layers=sliding, sliding_window=window if sliding else 0)
    values.update(arch.base_traits(spec))
    for sw in arch.switches:
        values[sw.trait] = sw.value if semantics.at_least(sw.library, sw.since) else sw.before
    return Traits(**values)


@lru_cache(maxsize=512)
def inventory(arch: Arch, spec) -> Inventory:
    """Every parameter tensor of ``spec``: embeddings (words, learned positions, OPT's
    projections), one layer (its linears, then its norms) and the final norms and an
    untied head."""
    h = spec.hidden_size
    e = spec.embed_dim or h
    embeddings = [Tensor("embed_tokens.weight", "embeddings", spec.vocab_size, e)]
    if spec.learned_positions:
        embeddings.append(Tensor("embed_positions.weight", "embeddings", spec.learned_positions, h))
    if e != h:  # OPTDecoder.project_out (h -> e) and project_in (e -> h), no bias
        embeddings += [Tensor("project_out.weight", "embeddings", h, e),
                       Tensor("project_in.weight", "embeddings", e, h)]
    layer = [t for lin in arch.linears(spec) for t in lin.tensors()] + arch.layer_norms(spec)
    dense_layers = min(arch.dense_layers(spec), spec.num_layers)
    dense = [t for lin in arch.dense_linears(spec) for t in lin.tensors()] + arch.layer_norms(spec) \
        if dense_layers else []
    final = _norm_tensors(spec) * arch.final_norms(spec)
    if not spec.tie_word_embeddings:
        final.append(Tensor("lm_head.weight", "lm_head", spec.vocab_size, e))
    other = tuple((tuple(t for lin in linears for t in lin.tensors()) + tuple(norms), n)
                  for linears, norms, n in arch.other_layers(spec) if n)
    return Inventory(tuple(embeddings + arch.root_tensors(spec)), tuple(layer), tuple(final), spec.num_layers,
                     tuple(dense), dense_layers, other)


def read_common_llama(f: Fields) -> dict[str, Any]:
    """The fields most decoders share under Llama's names (LlamaConfig,
    configuration_llama.py): used by the Llama-style families and the fallback. Read in
    this order, so a config with several faults is told about the same one first."""
    from ..configcheck import (
        MAX_EXPERTS,
        MAX_HEAD_DIM,
        MAX_HEADS,
        MAX_INTERMEDIATE,
        MAX_LAYERS,
        MAX_VOCAB,
        check_shapes,
    )
    h = f.int("hidden_size", "n_embd", "d_model", limit=MAX_HIDDEN)
    heads = f.int("num_attention_heads", "n_head", limit=MAX_HEADS)
    kv = f.int("num_key_value_heads", limit=MAX_HEADS, default=heads)  # LlamaConfig: None -> heads
    head_dim = f.int("head_dim", limit=MAX_HEAD_DIM, default=0)
    experts = f.int("num_local_experts", limit=MAX_EXPERTS, default=0)
    per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=0)
    check_shapes(f.where, h, heads, kv, head_dim_given=bool(head_dim), experts=experts, experts_per_token=per_token)
    attention_bias = f.bool("attention_bias", False)
    softcap = f.number("final_logit_softcapping")
    out = dict(
        hidden_size=h, num_layers=f.int("num_hidden_layers", "n_layer", limit=MAX_LAYERS),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim or h // heads,
        intermediate_size=f.int("intermediate_size", "ffn_dim", "n_inner", limit=MAX_INTERMEDIATE),
        vocab_size=f.int("vocab_size", limit=MAX_VOCAB),
        max_positions=f.int("max_position_embeddings", "n_positions", limit=MAX_POSITIONS, default=0),
        gated_mlp=True, hidden_act=f.text("hidden_act", "hidden_activation", default="silu"), norm="rmsnorm",
        norms_per_layer=2, qkv_bias=attention_bias, o_bias=attention_bias,
        mlp_bias=f.bool("mlp_bias", False), num_experts=experts, experts_per_token=per_token,
        attn_dropout=f.fraction("attention_dropout", 0.0), resid_dropout=f.fraction("resid_pdrop", 0.0),
        embd_dropout=f.fraction("embd_pdrop", 0.0), logit_softcap=bool(softcap))
    check_layer_types(f, out["num_layers"])
    return out


def _config_rope_factor(config: Mapping) -> float:
    """The ``factor`` of a config's rope scaling (transformers 4.x ``rope_scaling``, 5.x
    ``rope_parameters``), 0 without one. The llama3 type's factor stretches the original
    length that max_position_embeddings already includes (Llama 3.1: 8192 x 16 = 131072), so
    only scalings whose max_position_embeddings is the original length count."""
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if isinstance(rope, Mapping) and isinstance(rope.get("factor"), int | float) \
                and not isinstance(rope.get("factor"), bool):
            if rope.get("rope_type", rope.get("type")) == "llama3" or "original_max_position_embeddings" in rope:
                return 0.0  # max_position_embeddings is already the stretched length
            return float(rope["factor"])
    return 0.0


LAYER_TYPES = ("sliding_attention", "full_attention")


def check_layer_types(f: Fields, num_layers: int) -> None:
    """A config's ``layer_types``, where given: one of :data:`LAYER_TYPES` per layer, and a
    ``sliding_window`` that is a position count or null."""
    types = f.config.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != num_layers
                              or not all(t in LAYER_TYPES for t in types)):
        raise ConfigError(f"{f.where}: layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                          f"{num_layers} layers")
    f.int("sliding_window", limit=MAX_POSITIONS, default=0)


def config_flag(spec, key: str, default: bool) -> bool:
    """A boolean a family reads from its config beyond the ModelSpec fields."""
    config: Mapping = spec.config
    return bool(config.get(key, default))


def with_changes(tr: Traits, **changes) -> Traits:
    return replace(tr, **changes)
