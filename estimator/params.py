"""Exact parameter counts per module group, from the module shapes of each architecture.

Shapes follow the modeling files of transformers (``modeling_llama.py``,
``modeling_gpt2.py``, ``modeling_opt.py``, ...); a test builds every shipped config on
the meta device and checks these counts against ``model.parameters()`` exactly.
Architectures without a formula fall back to a meta-device count (needs transformers).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .configcheck import (
    META_BUILD_TIMEOUT_S,
    ConfigError,
    check_fallback_sizes,
    check_known_type,
    strip_code_keys,
    time_limit,
    where_of,
)
from .modelspec import FAMILIES, ModelSpec
from .setup import DEFAULT_LORA_TARGETS, Quant
from .units import FP32 as FP32_BYTES

GROUPS = ("embeddings", "attention", "mlp", "norms", "lm_head")


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

    def lora_rank_multiplier(self) -> int:
        """peft (0.21) wraps fused MoE expert parameters under all-linear with a rank of
        r * E (``ParamWrapper``), doubled for the concatenated gate_up projection."""
        if not self.fused_experts:
            return 1
        return self.copies * (2 if self.name == "gate_up_proj" else 1)

    @property
    def params(self) -> int:
        return self.copies * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@lru_cache(maxsize=256)
def layer_linears(spec: ModelSpec) -> tuple[Linear, ...]:
    return tuple(_layer_linears(spec))


def _layer_linears(spec: ModelSpec) -> list[Linear]:
    """The matrices of one decoder layer."""
    h, f = spec.hidden_size, spec.intermediate_size
    t = spec.model_type
    if t == "gpt2":  # GPT2Attention.c_attn/c_proj, GPT2MLP.c_fc/c_proj (Conv1D with bias)
        return [Linear("c_attn", "attention", h, 3 * h, True), Linear("c_proj", "attention", h, h, True),
                Linear("c_fc", "mlp", h, f, True), Linear("c_proj", "mlp", f, h, True)]
    if t == "gpt_neox":  # GPTNeoXAttention.query_key_value/dense, GPTNeoXMLP.dense_h_to_4h/dense_4h_to_h
        b = spec.qkv_bias
        return [Linear("query_key_value", "attention", h, 3 * h, b), Linear("dense", "attention", h, h, b),
                Linear("dense_h_to_4h", "mlp", h, f, True), Linear("dense_4h_to_h", "mlp", f, h, True)]
    if t in ("opt", "biogpt"):  # OPTAttention/BioGptAttention q/k/v/out_proj, decoder layer fc1/fc2
        b = spec.qkv_bias
        return [Linear("q_proj", "attention", h, h, b), Linear("k_proj", "attention", h, h, b),
                Linear("v_proj", "attention", h, h, b), Linear("out_proj", "attention", h, h, b),
                Linear("fc1", "mlp", h, f, b), Linear("fc2", "mlp", f, h, b)]
    q, kv = spec.q_dim, spec.kv_dim
    if t == "phi3":  # Phi3Attention.qkv_proj fused, Phi3MLP.gate_up_proj fused
        attention = [Linear("qkv_proj", "attention", h, q + 2 * kv, spec.qkv_bias),
                     Linear("o_proj", "attention", q, h, spec.o_bias)]
        return attention + [Linear("gate_up_proj", "mlp", h, 2 * f, spec.mlp_bias),
                            Linear("down_proj", "mlp", f, h, spec.mlp_bias)]
    attention = [Linear("q_proj", "attention", h, q, spec.qkv_bias),
                 Linear("k_proj", "attention", h, kv, spec.qkv_bias),
                 Linear("v_proj", "attention", h, kv, spec.qkv_bias),
                 Linear("o_proj", "attention", q, h, spec.o_bias)]
    if spec.num_experts:
        # MixtralSparseMoeBlock (transformers 5): router `gate` and MixtralExperts with fused
        # 3-D parameters gate_up_proj (E, 2f, h) and down_proj (E, h, f)
        e = spec.num_experts
        return attention + [Linear("gate", "mlp", h, e, False),
                            Linear("gate_up_proj", "mlp", h, 2 * f, False, copies=e, fused_experts=True),
                            Linear("down_proj", "mlp", f, h, False, copies=e, fused_experts=True)]
    return attention + [Linear("gate_proj", "mlp", h, f, spec.mlp_bias),
                        Linear("up_proj", "mlp", h, f, spec.mlp_bias),
                        Linear("down_proj", "mlp", f, h, spec.mlp_bias)]


def _norm_params(spec: ModelSpec) -> int:
    # RMSNorm: weight (h); LayerNorm: weight + bias (2h)
    return spec.hidden_size * (1 if spec.norm == "rmsnorm" else 2)


def _final_norms(spec: ModelSpec) -> int:
    if spec.model_type == "opt":
        # OPTDecoder.final_layer_norm exists only with do_layer_norm_before and not _remove_final_layer_norm
        cfg = spec.config
        return int(bool(cfg.get("do_layer_norm_before", True)) and not cfg.get("_remove_final_layer_norm", False))
    return 1


@dataclass(frozen=True)
class ParamCount:
    groups: dict[str, int]
    exact: bool  # True: from a formula; False: counted by a meta-device build
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.groups.values())


@lru_cache(maxsize=256)
def count_params(spec: ModelSpec) -> ParamCount:
    """Parameters per group (embeddings, attention, mlp, norms, lm_head); tied heads count once."""
    if not spec.has_formula:
        return meta_count(spec)
    h, V, L = spec.hidden_size, spec.vocab_size, spec.num_layers
    embed_dim = spec.embed_dim or h
    embeddings = V * embed_dim + spec.learned_positions * h
    if embed_dim != h:  # OPTDecoder.project_in / project_out (no bias)
        embeddings += 2 * h * embed_dim
    groups = {g: 0 for g in GROUPS}
    groups["embeddings"] = embeddings
    for lin in layer_linears(spec):
        groups[lin.group] += L * lin.params
    groups["norms"] = (L * spec.norms_per_layer + _final_norms(spec)) * _norm_params(spec)
    groups["lm_head"] = 0 if spec.tie_word_embeddings else V * embed_dim
    return ParamCount(groups=groups, exact=True)


@lru_cache(maxsize=256)
def param_tensor_sizes(spec: ModelSpec) -> tuple[int, ...]:
    """Element count of every parameter tensor of the model (tied heads once)."""
    h = spec.hidden_size
    embed_dim = spec.embed_dim or h
    sizes = [spec.vocab_size * embed_dim]
    if spec.learned_positions:
        sizes.append(spec.learned_positions * h)
    if embed_dim != h:
        sizes += [h * embed_dim, h * embed_dim]
    layer: list[int] = []
    for lin in layer_linears(spec):
        layer.append(lin.copies * lin.in_features * lin.out_features)
        if lin.bias:
            layer.append(lin.copies * lin.out_features)
    norm = [h] if spec.norm == "rmsnorm" else [h, h]
    layer += norm * spec.norms_per_layer
    sizes += layer * spec.num_layers + norm * _final_norms(spec)
    if not spec.tie_word_embeddings:
        sizes.append(spec.vocab_size * embed_dim)
    return tuple(sizes)


def group_of(param_name: str) -> str:
    """Group of a parameter by its name in a transformers model (used by the meta count)."""
    n = param_name.lower()
    if "lm_head" in n or "embed_out" in n:  # GPT-NeoX's untied head is embed_out in transformers 4.x
        return "lm_head"
    if "norm" in n or ".ln_" in n or n.startswith("ln_") or "layernorm" in n:
        return "norms"
    if any(k in n for k in ("embed", "wte", "wpe", "project_in", "project_out")):
        return "embeddings"
    if "attn" in n or "attention" in n:
        return "attention"
    return "mlp"


def meta_count(spec: ModelSpec) -> ParamCount:
    """Build the config on the meta device with transformers and count (no memory used)."""
    model = build_meta_model(spec)
    groups = {g: 0 for g in GROUPS}
    for name, p in model.named_parameters():  # named_parameters() skips tied duplicates
        groups[group_of(name)] += p.numel()
    return ParamCount(groups=groups, exact=False,
                      note=f"no formula for model_type {spec.model_type!r}: parameters counted on a "
                           f"meta-device build with transformers; activations use the Llama-style formula")


def build_meta_model(spec: ModelSpec):
    """The model of a config without a formula, built on the meta device (no memory), under
    the same limits as the families with one (configcheck.check_fallback_sizes) and a time
    limit (META_BUILD_TIMEOUT_S). Keys that load code or kernels never reach transformers."""
    where = where_of(spec.source, spec.name)
    config, _ = strip_code_keys(spec.config)
    check_fallback_sizes(config, where)
    try:
        import torch
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ValueError(f"model_type {spec.model_type!r} needs transformers to be counted ({exc})") from None
    check_known_type(spec.model_type, where, FAMILIES, CONFIG_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                     transformers.__version__)
    try:
        with time_limit(META_BUILD_TIMEOUT_S, f"building model_type {spec.model_type!r} of {where} on the meta "
                                              f"device took over {META_BUILD_TIMEOUT_S:.0f} s"):
            cfg = transformers.AutoConfig.for_model(**config)
            with torch.device("meta"):
                return transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects, in any of its ways
        message = " ".join(str(exc).split())
        if len(message) > 120:
            message = message[:117] + "..."
        raise ConfigError(f"transformers cannot build model_type {spec.model_type!r} from {where}: "
                          f"{type(exc).__name__}: {message}") from None


# --- LoRA and quantization: which matrices they touch ----------------------------------

def lora_params(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> int:
    """Adapter parameters: r * (in + out) per targeted matrix (peft LoraLayer: lora_A in->r, lora_B r->out)."""
    per_layer = 0
    for lin in lora_targets(spec, targets):
        per_layer += rank * lin.lora_rank_multiplier() * (lin.in_features + lin.out_features)
    return spec.num_layers * per_layer


#: peft's default LoRA target_modules per model_type, what ``LoraConfig(target_modules=None)``
#: adapts (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21).
#: peft has no entry for phi3; its fused ``qkv_proj`` holds the q and v projections the others adapt.
#: peft has none for biogpt either: it gets the common default (q_proj, v_proj).
PEFT_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",), "opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"), "mixtral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"), "phi3": ("qkv_proj",),
    "gpt_neox": ("query_key_value",)}


def default_lora_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The LoRA targets a user gets without naming any: peft's default for the model type."""
    return PEFT_DEFAULT_TARGETS.get(spec.model_type, DEFAULT_LORA_TARGETS)


def lora_targets(spec: ModelSpec, targets: tuple[str, ...]) -> list[Linear]:
    """The matrices of one layer that a list of peft ``target_modules`` names selects."""
    if tuple(t.lower() for t in targets) in (("all-linear",), ("all_linear",)):
        return layer_linears(spec)  # peft "all-linear": every linear but the output layer
    linears = [lin for lin in layer_linears(spec) if not lin.fused_experts]  # named: nn.Linear only
    names = {lin.name for lin in linears}
    unknown = [t for t in targets if t not in names]
    if unknown and tuple(targets) == DEFAULT_LORA_TARGETS:
        raise ValueError(f"the default LoRA targets {','.join(targets)} are not modules of {spec.name} "
                         f"({spec.model_type}); pass --lora-targets with some of: {', '.join(sorted(names))} "
                         f"or all-linear (peft's default here: {','.join(default_lora_targets(spec))})")
    if unknown:
        raise ValueError(f"LoRA target {unknown[0]!r} is not a module of {spec.name} "
                         f"({spec.model_type}); choose from: {', '.join(sorted(names))} or all-linear")
    return [lin for lin in linears if lin.name in targets]


def quantized_params(spec: ModelSpec, experts_fused: bool = True) -> tuple[int, int, int]:
    """(quantized weight elements, their output rows, biases) over all layers.

    bitsandbytes replaces the decoder's linear layers; ``lm_head`` is kept in the
    compute dtype (transformers ``get_keys_to_not_convert``), as are embeddings, norms
    and fused MoE expert parameters (not nn.Linear modules). ``experts_fused=False``:
    transformers < 5 built each expert from nn.Linear modules (4.57.0
    models/mixtral/modeling_mixtral.py:63 ``self.w1 = nn.Linear``), which bitsandbytes
    quantizes (estimator/versions.py Semantics.moe_experts_fused).
    """
    weights = rows = biases = 0
    for lin in layer_linears(spec):
        if lin.fused_experts and experts_fused:
            continue
        weights += lin.copies * lin.in_features * lin.out_features
        rows += lin.copies * lin.out_features
        biases += lin.copies * lin.out_features if lin.bias else 0
    L = spec.num_layers
    return L * weights, L * rows, L * biases


#: QLoRA NF4 (Dettmers et al. 2023, Sec. 3): 4-bit values, one fp32 absmax per 64-value
#: block (0.5 bit/param); double quantization stores absmax in 8 bits with one fp32
#: constant per 256 absmax (0.127 bit/param).
NF4_BLOCK = 64
DQ_BLOCK = 256


def quant_state_bytes(spec: ModelSpec, quant, moe_fused: bool) -> int:
    """Bytes of bitsandbytes' quantization state beside the packed weights: NF4's fp32
    absmax per 64-value block (8-bit under double quantization, plus one fp32 constant per
    256 of them); LLM.int8's fp32 scale per output row (SCB; Dettmers et al. 2022). This
    state is no parameter -- ``Params4bit.quant_state`` / ``Int8Params.SCB`` are attributes
    (bitsandbytes/nn/modules.py) -- so FSDP, which shards parameters, leaves it whole on
    every rank (estimator/sharding.py): bitsandbytes PR #970 added ``quant_storage`` so FSDP
    can flatten and shard the packed 4-bit data at all (FSDP shards floating-point
    parameters only); AnswerDotAI/fsdp_qlora PR #4: "Linear4bit layers store the
    quantization information in the quant_state dictionary", kept on every rank's layers."""
    quant = Quant.parse(quant)
    if quant is Quant.NONE:
        return 0
    q_elems, q_rows, _ = quantized_params(spec, moe_fused)
    if quant is Quant.INT8:
        return FP32_BYTES * q_rows
    absmax = q_elems // NF4_BLOCK
    return absmax + FP32_BYTES * (absmax // DQ_BLOCK) if quant is Quant.NF4_DQ else FP32_BYTES * absmax
