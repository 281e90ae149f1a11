"""Exact parameter counts per module group, from the module shapes of each architecture.

Shapes follow the modeling files of transformers (``modeling_llama.py``,
``modeling_gpt2.py``, ``modeling_opt.py``, ...); a test builds every shipped config on
the meta device and checks these counts against ``model.parameters()`` exactly.
Architectures without a formula fall back to a meta-device count (needs transformers).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .archs import Linear, arch_of, inventory_of
from .archs.meta import build_meta_model, meta_linears
from .modelspec import ModelSpec
from .setup import DEFAULT_LORA_TARGETS, Quant
from .units import FP32 as FP32_BYTES

GROUPS = ("embeddings", "attention", "mlp", "norms", "lm_head")
#: How far Llama-style terms have been from measured peaks of other families (issue 21's
#: independent checks: MLA -28 %, Qwen3 / Gemma 3 / OLMo 2 -8 % to -10 % against the sim,
#: GPT-BigCode's multi-query attention +17 % to +33 % on published A100 rows).
FALLBACK_ERROR_RANGE = "known to be off by -28 % to +33 % on other families"


@lru_cache(maxsize=256)
def layer_linears(spec: ModelSpec) -> tuple[Linear, ...]:
    """The matrices of one decoder layer (its family's inventory, estimator/archs)."""
    return tuple(arch_of(spec).linears(spec))


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
    return ParamCount(groups=inventory_of(spec).groups(GROUPS), exact=True)


@lru_cache(maxsize=256)
def param_tensor_sizes(spec: ModelSpec) -> tuple[int, ...]:
    """Element count of every parameter tensor of the model (tied heads once)."""
    return inventory_of(spec).sizes()


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
                      note=f"no formula for model_type {spec.model_type!r}: parameters and quantized linears "
                           f"counted on a meta-device build with transformers; activations from the Llama-style "
                           f"terms (--allow-llama-fallback), {FALLBACK_ERROR_RANGE}")


# --- LoRA and quantization: which matrices they touch ----------------------------------

def lora_params(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> int:
    """Adapter parameters: r * (in + out) per targeted matrix (peft LoraLayer: lora_A in->r, lora_B r->out),
    over the layers of each kind (a family's first dense layers: Arch.dense_layers)."""
    dense = min(arch_of(spec).dense_layers(spec), spec.num_layers)

    def per_layer(linears: list[Linear]) -> int:
        return sum(rank * lin.lora_rank_multiplier() * (lin.in_features + lin.out_features) for lin in linears)
    other = arch_of(spec).other_layers(spec)
    out = (spec.num_layers - dense - sum(n for _, _, n in other)) * per_layer(lora_targets(spec, targets))
    out += sum(n * per_layer(_targets_among(linears, targets)) for linears, _, n in other)
    out += per_layer(_targets_among(arch_of(spec).root_linears(spec), targets))
    return out + (dense * per_layer(lora_targets(spec, targets, dense=True)) if dense else 0)


def _targets_among(linears: list[Linear], targets: tuple[str, ...]) -> list[Linear]:
    """Of a further layer kind's matrices (Arch.other_layers), those peft wraps for ``targets``: its
    nn.Linear modules, by name or all of them (families whose fused experts peft does not map)."""
    every = tuple(t.lower() for t in targets) in (("all-linear",), ("all_linear",))
    return [lin for lin in linears if not (lin.fused_experts or lin.router) and (every or lin.name in targets)]


def default_lora_targets(spec: ModelSpec) -> tuple[str, ...]:
    """The LoRA targets a user gets without naming any: peft's default for the model type
    (its family's ``peft_targets``)."""
    return arch_of(spec).peft_targets


def lora_targets(spec: ModelSpec, targets: tuple[str, ...], dense: bool = False) -> list[Linear]:
    """The matrices of one layer that a list of peft ``target_modules`` names selects (``dense``:
    of a family's first dense layers, Arch.dense_layers)."""
    if arch_of(spec).peft_moe_names:
        return _converted_lora_targets(spec, targets, dense)
    maps = arch_of(spec).peft_maps_experts  # peft's transformers-4 names for fused experts (archs/base.py)
    if tuple(t.lower() for t in targets) in (("all-linear",), ("all_linear",)):
        # peft "all-linear": every nn.Linear but the output layer, and where peft maps them, the
        # fused experts and the router; elsewhere those are not nn.Linear and stay frozen
        return [lin for lin in layer_linears(spec) if maps or not (lin.fused_experts or lin.router)]
    # named: nn.Linear only (a router of its own class is not one where peft maps nothing)
    linears = [lin for lin in layer_linears(spec) if not lin.fused_experts and (maps or not lin.router)]
    # a name of another layer kind only (Arch.other_layers: Qwen3.5's full-attention q_proj beside its
    # linear-attention layers) is a module peft wraps too: only a name no layer holds is unknown
    others = {lin.name for kind, _, _ in arch_of(spec).other_layers(spec)
              for lin in _targets_among(kind, ("all-linear",))}
    names = {lin.name for lin in linears} | others
    unknown = [t for t in targets if t not in names]
    if unknown and not maps and spec.num_experts:
        raise ValueError(f"LoRA target {unknown[0]!r} is not a module peft 0.21 can wrap in {spec.name} "
                         f"({spec.model_type}): its experts are 3-D parameters and its router a module of its own "
                         f"class, which target_modules cannot select (peft: \"Target modules ... not found\"); "
                         f"choose from: {', '.join(sorted(names))} or all-linear (which wraps those only)")
    if unknown and tuple(targets) == DEFAULT_LORA_TARGETS:
        raise ValueError(f"the default LoRA targets {','.join(targets)} are not modules of {spec.name} "
                         f"({spec.model_type}); pass --lora-targets with some of: {', '.join(sorted(names))} "
                         f"or all-linear (peft's default here: {','.join(default_lora_targets(spec))})")
    if unknown:
        raise ValueError(f"LoRA target {unknown[0]!r} is not a module of {spec.name} "
                         f"({spec.model_type}); choose from: {', '.join(sorted(names))} or all-linear")
    return [lin for lin in linears if lin.name in targets]


def _converted_lora_targets(spec: ModelSpec, targets: tuple[str, ...], dense: bool) -> list[Linear]:
    """What peft 0.21 wraps where its MoE conversion renames targets (Arch.peft_moe_names;
    peft/utils/transformers_weight_conversion.py): ``all-linear`` is resolved to the nn.Linear
    names plus every mapped name (:370-374), then each target in the mapping is replaced by the
    fused parameter it names and dropped from ``target_modules`` (:444-456), so nn.Linear modules
    of a mapped name (dense and shared-expert MLPs) are never wrapped; a fused parameter needs all
    its parts named (:460-467 raises otherwise). Checked on peft 0.21.2 (tests/test_deepseek_v3.py)."""
    arch = arch_of(spec)
    mapping = arch.peft_moe_names
    linears = arch.dense_linears(spec) if dense else list(layer_linears(spec))
    every = arch.linears(spec) + arch.dense_linears(spec)
    plain = sorted({lin.name for lin in every if not (lin.fused_experts or lin.router)} - set(mapping))
    if tuple(t.lower() for t in targets) in (("all-linear",), ("all_linear",)):
        targets = tuple(plain) + tuple(mapping)
    unknown = [t for t in targets if t not in plain and t not in mapping]
    if unknown:
        raise ValueError(f"LoRA target {unknown[0]!r} is not a module peft 0.21 wraps in {spec.name} "
                         f"({spec.model_type}); choose from: {', '.join(sorted(plain + list(mapping)))} or all-linear")
    for fused in sorted(set(mapping.values())):
        parts = sorted(old for old, new in mapping.items() if new == fused)
        named = [old for old in parts if old in targets]
        if named and len(named) < len(parts):
            raise ValueError(f"LoRA targets {', '.join(named)} need {', '.join(sorted(set(parts) - set(named)))} "
                             f"too in {spec.name}: peft 0.21 fuses them into {fused} (\"Cannot convert PEFT "
                             f"target(s)\")")
    wanted = {mapping.get(t, t) for t in targets}
    # a mapped name reaches the fused parameter or the router only, never an nn.Linear of that name
    return [lin for lin in linears
            if lin.name in wanted and (lin.fused_experts or lin.router or lin.name not in mapping)]


def quantized_params(spec: ModelSpec, experts_fused: bool = True) -> tuple[int, int, int]:
    """(quantized weight elements, their output rows, biases) over all layers.

    bitsandbytes replaces the decoder's linear layers; ``lm_head`` is kept in the
    compute dtype (transformers ``get_keys_to_not_convert``), as are embeddings, norms
    and fused MoE expert parameters and routers (not nn.Linear modules in transformers 5:
    5.24 models/mixtral/modeling_mixtral.py:96 MixtralTopKRouter holds its own weight). ``experts_fused=False``:
    transformers < 5 built each expert from nn.Linear modules (4.57.0
    models/mixtral/modeling_mixtral.py:63 ``self.w1 = nn.Linear``), which bitsandbytes
    quantizes (estimator/versions.py Semantics.moe_experts_fused). A model type without a
    formula is counted from its meta-device build's nn.Linear modules (archs/meta.py).
    """
    if not spec.has_formula:
        return meta_linears(spec)
    tensors = quantized_tensors(spec, experts_fused)
    biases = sum(lin.copies * lin.out_features * layers for lin, layers in _layer_kinds(spec)
                 if lin.bias and not ((lin.fused_experts or lin.router) and experts_fused))
    return sum(n * k for n, _, k in tensors), sum(r * k for _, r, k in tensors), biases


def _layer_kinds(spec: ModelSpec) -> list[tuple[Linear, int]]:
    """Every matrix of a decoder layer with the number of layers holding it (a family's first
    dense layers apart: Arch.dense_layers)."""
    arch = arch_of(spec)
    dense = min(arch.dense_layers(spec), spec.num_layers)
    other = arch.other_layers(spec)
    repeated = spec.num_layers - dense - sum(n for _, _, n in other)
    return [(lin, dense) for lin in (arch.dense_linears(spec) if dense else [])] \
        + [(lin, repeated) for lin in layer_linears(spec)] + [(lin, n) for linears, _, n in other for lin in linears]


@lru_cache(maxsize=256)
def quantized_tensors(spec: ModelSpec, experts_fused: bool = True) -> tuple[tuple[int, int, int], ...]:
    """(elements, output rows, how many) of the weight tensors bitsandbytes quantizes, one row
    per distinct shape and role (a layer's linears times the layers, OPT's projections);
    each tensor carries its own quantization state (:func:`quant_state_bytes`)."""
    rows: list[tuple[int, int, int]] = []
    for lin, layers in _layer_kinds(spec):
        if (lin.fused_experts or lin.router) and experts_fused:
            continue
        rows.append((lin.in_features * lin.out_features, lin.out_features, lin.copies * layers))
    rows += [(lin.in_features * lin.out_features, lin.out_features, 1) for lin in arch_of(spec).root_linears(spec)]
    h, e = spec.hidden_size, spec.embed_dim or spec.hidden_size
    if e != h:
        # OPT's project_in (e -> h) and project_out (h -> e) are nn.Linear modules of the decoder
        # (models/opt/modeling_opt.py OPTDecoder), replaced like the layers' linears
        rows += [(h * e, h, 1), (h * e, e, 1)]
    return tuple(rows)


#: QLoRA NF4 (Dettmers et al. 2023, Sec. 3): 4-bit values, one fp32 absmax per 64-value
#: block (0.5 bit/param); double quantization stores absmax in 8 bits with one fp32
#: constant per 256 absmax (0.127 bit/param). bitsandbytes 0.50.2 functional.py
#: ``quantize_4bit`` (blocksize 64, nested blocksize 256) keeps per tensor: the 16-value
#: fp32 code of its type (``get_4bit_type``), and nested the mean it subtracted (``offset``,
#: one fp32) and the 256-value fp32 code of the absmax quantization (``create_dynamic_map``),
#: each tensor's own copies (measured: one storage per linear).
NF4_BLOCK = 64
DQ_BLOCK = 256
NF4_CODE_VALUES = 16
DQ_CODE_VALUES = 256


def quant_state_bytes(spec: ModelSpec, quant, moe_fused: bool) -> int:
    """Bytes of bitsandbytes' quantization state beside the packed weights, per quantized
    tensor of n values: NF4 / FP4 keep an fp32 absmax per 64-value block and their 16-value
    fp32 code; double quantization keeps the absmax in 8 bits, an fp32 absmax per 256 of
    them, the fp32 offset and the 256-value code; LLM.int8 an fp32 scale per output row
    (SCB; Dettmers et al. 2022). This state is no parameter -- ``Params4bit.quant_state`` /
    ``Int8Params.SCB`` are attributes (bitsandbytes/nn/modules.py) -- so FSDP, which shards
    parameters, leaves it whole on every rank (estimator/sharding.py): bitsandbytes PR #970
    added ``quant_storage`` so FSDP can flatten and shard the packed 4-bit data at all (FSDP
    shards floating-point parameters only); AnswerDotAI/fsdp_qlora PR #4: "Linear4bit layers
    store the quantization information in the quant_state dictionary", kept on every rank's layers."""
    quant = Quant.parse(quant)
    if quant is Quant.NONE:
        return 0
    if not spec.has_formula:  # no per-tensor shapes: the totals' state, without the codes
        q_elems, q_rows, _ = quantized_params(spec, moe_fused)
        if quant is Quant.INT8:
            return FP32_BYTES * q_rows
        absmax = -(-q_elems // NF4_BLOCK)
        return absmax + FP32_BYTES * -(-absmax // DQ_BLOCK) if quant is Quant.NF4_DQ else FP32_BYTES * absmax
    total = 0
    for elems, rows, count in quantized_tensors(spec, moe_fused):
        if quant is Quant.INT8:
            per = FP32_BYTES * rows
        else:
            blocks = -(-elems // NF4_BLOCK)
            per = FP32_BYTES * NF4_CODE_VALUES
            if quant is Quant.NF4_DQ:
                per += blocks + FP32_BYTES * (-(-blocks // DQ_BLOCK) + 1 + DQ_CODE_VALUES)
            else:
                per += FP32_BYTES * blocks
        total += per * count
    return total
