"""estimate(): bytes per Category at the peak of a step, and the phase where it falls.

Model states follow ZeRO (Rajbhandari et al. 2019, Sec. 3: mixed-precision Adam keeps
2 + 2 + 12 bytes/param) and PyTorch's optimizers (state in the parameter's dtype);
activations come from ``activations.py``; overheads from ``overheads.py``.
Each phase's resident set is computed separately and the largest is the peak.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional

from . import activations as acts
from .categories import Category, Phase, TENSOR_CATEGORIES
from .gpus import GPU
from .modelspec import ModelSpec
from .overheads import DEFAULT, Overheads, calibration_key, workspace_for
from .params import (ParamCount, count_params, layer_linears, lora_params, lora_targets,
                     param_tensor_sizes, quantized_params)
from .setup import Device, Mode, Optimizer, OptimizerImpl, Precision, Quant, Setup, Sharding
from .sharding import RankStates, layer_working_set, per_rank_states, with_extra

FP32 = 4
_CATEGORY = {c.value: c for c in Category}
_ZERO = dict.fromkeys(Category, 0)
_CONTEXT, _ALLOCATOR = Category.CONTEXT, Category.ALLOCATOR
#: state tensors each optimizer keeps per parameter tensor
_STATE_TENSORS = {Optimizer.ADAMW: 2, Optimizer.ADAMW_8BIT: 2, Optimizer.SGD: 0,
                  Optimizer.SGD_MOMENTUM: 1, Optimizer.ADAFACTOR: 1}
_SHARDED_STATES = (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP)  # iterating an Enum is slow: copy this template instead

#: bitsandbytes 8-bit optimizers: blockwise quantized state (Dettmers et al. 2022,
#: "8-bit Optimizers via Block-wise Quantization"): 1 byte per value plus one fp32
#: absmax per 256-value block (bitsandbytes functional.py, blocksize=256); tensors
#: under min_8bit_size = 4096 elements keep 32-bit state (bitsandbytes optim/optimizer.py).
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096

#: QLoRA NF4 (Dettmers et al. 2023, Sec. 3): 4-bit values, one fp32 absmax per 64-value
#: block (0.5 bit/param); double quantization stores absmax in 8 bits with one fp32
#: constant per 256 absmax (0.127 bit/param).
NF4_BLOCK = 64
DQ_BLOCK = 256


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per category at the peak phase, and every phase's breakdown."""

    model: str
    setup: Setup
    params: int
    trainable_params: int
    peak_phase: Phase
    phases: Dict[Phase, Dict[Category, int]]
    param_groups: Dict[str, int] = field(default_factory=dict)
    notes: tuple = ()
    overheads_source: str = DEFAULT.source
    calibration_key: str = ""

    @property
    def components(self) -> Dict[Category, int]:
        return self.phases[self.peak_phase]

    @property
    def total_bytes(self) -> int:
        """Everything on the device at the peak: tensors, allocator cache and context (NVML's view)."""
        return sum(self.components.values())

    @property
    def allocated_bytes(self) -> int:
        """The part ``torch.cuda.max_memory_allocated`` counts: live tensors."""
        return sum(v for k, v in self.components.items() if k in TENSOR_CATEGORIES)

    @property
    def reserved_bytes(self) -> int:
        return self.allocated_bytes + self.components.get(Category.ALLOCATOR, 0)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "peak_phase": self.peak_phase.value,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "param_groups": dict(self.param_groups),
            "components": {c.value: self.components.get(c, 0) for c in Category},
            "phases": {ph.value: {c.value: comp.get(c, 0) for c in Category}
                       for ph, comp in self.phases.items()},
            "setup": self.setup.to_dict(),
            "overheads": self.overheads_source,
            "calibration_key": self.calibration_key,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class ModelStates:
    weights: int
    gradients: int
    optimizer_state: int
    trainable: int
    largest_trainable_tensor: int  # elements
    linear_weights: int  # elements of matmul weights (autocast casts them)


def _trainable_tensor_sizes(spec: ModelSpec, setup: Setup) -> List[int]:
    """Element counts of the trainable parameter tensors."""
    if setup.mode in (Mode.LORA, Mode.QLORA):
        per_layer: List[int] = []
        for lin in lora_targets(spec, setup.lora_targets):
            per_layer += [setup.lora_rank * lin.in_features, setup.lora_rank * lin.out_features]
        return per_layer * spec.num_layers
    return param_tensor_sizes(spec)


def model_states(spec: ModelSpec, setup: Setup, count: Optional[ParamCount] = None) -> ModelStates:
    """Weights, gradients and optimizer state in bytes (unsharded); batch and seq play no part."""
    return _model_states(spec, _StateKey(setup.mode, setup.precision, setup.quant, setup.optimizer,
                                         setup.lora_rank, setup.lora_targets))


class _StateKey(NamedTuple):
    """The fields of a Setup that model states depend on (a cheap cache key)."""

    mode: Mode
    precision: Precision
    quant: Quant
    optimizer: Optimizer
    lora_rank: int
    lora_targets: tuple


@lru_cache(maxsize=4096)
def _model_states(spec: ModelSpec, setup: _StateKey) -> ModelStates:
    count = count_params(spec)
    n = count.total
    prec = setup.precision
    pbytes = prec.param_bytes
    linear_weights = sum(l.copies * l.in_features * l.out_features for l in layer_linears(spec)) \
        * spec.num_layers + spec.vocab_size * (spec.embed_dim or spec.hidden_size)
    # weights -----------------------------------------------------------------------------
    if setup.quant is not Quant.NONE:
        q_elems, q_rows, q_bias = quantized_params(spec)
        rest = n - q_elems - q_bias
        half = 2  # bitsandbytes keeps non-quantized modules and biases in the compute dtype
        if setup.quant is Quant.INT8:
            # LLM.int8 (Dettmers et al. 2022): int8 weights + one fp32 scale per output row (SCB)
            qbytes = q_elems + FP32 * q_rows
        else:
            absmax = q_elems // NF4_BLOCK
            qbytes = q_elems // 2 + (absmax + FP32 * (absmax // DQ_BLOCK) if setup.quant is Quant.NF4_DQ
                                     else FP32 * absmax)
        weights = qbytes + half * (rest + q_bias)
    else:
        weights = n * pbytes
    # trainable parameters ----------------------------------------------------------------
    if setup.mode is Mode.INFERENCE:
        return ModelStates(weights, 0, 0, 0, 0, linear_weights)
    if setup.mode in (Mode.LORA, Mode.QLORA):
        trainable = lora_params(spec, setup.lora_targets, setup.lora_rank)
        weights += FP32 * trainable  # peft autocast_adapter_dtype=True keeps adapters fp32
        state_bytes = grad_bytes = FP32
    else:
        trainable = n
        grad_bytes = pbytes  # .grad has the parameter's dtype
        # torch.optim keeps state in the parameter's dtype; mixed-bf16 keeps fp32 states
        state_bytes = FP32 if prec is Precision.MIXED_BF16 else pbytes
    sizes = _trainable_tensor_sizes(spec, setup)
    big = sum(x for x in sizes if x >= BNB_MIN_8BIT_SIZE)
    small = sum(x for x in sizes if x < BNB_MIN_8BIT_SIZE)
    largest = max(sizes, default=0)
    gradients = trainable * grad_bytes
    opt = setup.optimizer
    if opt is Optimizer.ADAMW:
        optimizer_state = 2 * state_bytes * trainable  # exp_avg, exp_avg_sq
    elif opt is Optimizer.ADAMW_8BIT:
        optimizer_state = 2 * (big + FP32 * -(-big // BNB_BLOCK)) + 2 * FP32 * small
    elif opt is Optimizer.SGD:
        optimizer_state = 0
    elif opt is Optimizer.SGD_MOMENTUM:
        optimizer_state = state_bytes * trainable  # momentum_buffer
    else:  # Adafactor (Shazeer & Stern 2018): factored second moment, rows + cols per matrix
        optimizer_state = state_bytes * _adafactor_elems(spec, setup)
    if setup.mode is Mode.FULL and prec is Precision.MIXED_BF16:
        optimizer_state += FP32 * trainable  # fp32 master weights (ZeRO's K = 12 includes them)
    return ModelStates(weights, gradients, optimizer_state, trainable, largest, linear_weights)


def _adafactor_elems(spec: ModelSpec, setup: Setup) -> int:
    """Adafactor keeps a row and a column statistic per matrix, a full one per vector."""
    h = spec.hidden_size
    if setup.mode in (Mode.LORA, Mode.QLORA):
        per_layer = sum((lin.in_features + setup.lora_rank) + (setup.lora_rank + lin.out_features)
                        for lin in lora_targets(spec, setup.lora_targets))
        return per_layer * spec.num_layers
    per_layer = sum(lin.copies * (lin.in_features + lin.out_features + (lin.out_features if lin.bias else 0))
                    for lin in layer_linears(spec))
    per_layer += spec.norms_per_layer * h * (1 if spec.norm == "rmsnorm" else 2)
    embed = spec.vocab_size + (spec.embed_dim or h)
    heads = 0 if spec.tie_word_embeddings else embed
    return per_layer * spec.num_layers + embed + heads + spec.learned_positions + h


def optimizer_temporaries(setup: Setup, states: ModelStates) -> int:
    """Bytes torch.optim allocates inside ``step()`` beyond its state.

    AdamW foreach (torch/optim/adam.py::_multi_tensor_adam): ``torch._foreach_sqrt(exp_avg_sqs)``
    makes one state-sized list; the for-loop path builds ``exp_avg_sq.sqrt() / bias_correction2_sqrt``
    per tensor (two temporaries of the largest tensor at once); fused kernels allocate none.
    """
    if setup.mode is Mode.INFERENCE or setup.optimizer in (Optimizer.ADAMW_8BIT, Optimizer.SGD,
                                                           Optimizer.SGD_MOMENTUM):
        return 0
    per_elem = states.optimizer_state // max(states.trainable, 1) // (2 if setup.optimizer is Optimizer.ADAMW else 1)
    if setup.precision is Precision.MIXED_BF16 and setup.mode is Mode.FULL:
        per_elem = FP32
    impl = setup.resolved_optimizer_impl
    if impl is OptimizerImpl.FUSED:
        return 0
    if impl is OptimizerImpl.FOREACH:
        return per_elem * states.trainable
    return 2 * per_elem * states.largest_trainable_tensor


def estimate(spec: ModelSpec, setup: Setup, gpu: Optional[GPU] = None,
             overheads: Overheads = DEFAULT) -> Estimate:
    """Predict the peak memory of one step of ``setup`` on ``spec``."""
    if spec.max_positions and setup.seq + setup.new_tokens > spec.max_positions:
        raise ValueError(f"seq {setup.seq + setup.new_tokens} is beyond {spec.name}'s "
                         f"{spec.max_positions} positions (max_position_embeddings)")
    count = count_params(spec)
    notes = [count.note] if count.note else []
    group = _group(spec.family, setup.attn, setup.precision)
    k = overheads.factor_for(group)
    cuda = setup.device is Device.CUDA
    st = _static(spec, _StaticKey(
        setup.mode, setup.precision, setup.quant, setup.optimizer, setup.optimizer_impl, setup.lora_rank,
        setup.lora_targets, setup.device, setup.world_size, setup.sharding,
        (workspace_for(gpu.architecture) if gpu else overheads.workspace_bytes) if cuda else 0,
        overheads.context_bytes if cuda else 0, overheads.allocator_per_large_tensor_bytes if cuda else 0))
    states = st.states
    W, G, O = st.weights, st.gradients, st.optimizer_state
    ranked = st.ranked  # per rank: ZeRO Table 1, DDP buckets, FSDP2 gathering (sharding.py)
    workspace, context, per_tensor = st.workspace, st.context, st.per_tensor
    big, n_states, n_grads = st.big, st.n_states, st.n_grads
    phases: Dict[Phase, Dict[Category, int]] = {}
    fraction = overheads.allocator_fraction

    def phase(tensors: int, **parts: int) -> Dict[Category, int]:
        out = _ZERO.copy()
        for key, value in parts.items():
            out[_CATEGORY[key]] = int(value)
        out[_CONTEXT] = context
        if fraction is None or not cuda:
            out[_ALLOCATOR] = per_tensor * tensors
        else:
            out[_ALLOCATOR] = int(fraction * sum(v for c, v in out.items() if c in TENSOR_CATEGORIES))
        return out

    if setup.training:
        if setup.grad_ckpt:
            act = acts.checkpointed_activations(spec, setup)
        else:
            act = acts.training_activations(spec, setup)
        A = int(act.total * k)
        logits = {ph: int(v * k) for ph, v in acts.logits_bytes(spec, setup).items()}
        cast_cache = st.cast_cache
        fb_temps = workspace + cast_cache + overheads.constant_bytes
        n_act = len(act.per_layer) * act.layers + len(act.outside)
        recomputed = act.outside.get("recomputed_layer", 0)
        saved = A - recomputed
        forward = [phase(big + n_states + n_act + 3, **with_extra(
            ranked.forward_extra(), weights=W, optimizer_state=O, activations=A,
            logits=logits["forward"], temporaries=fb_temps))]
        if ranked.gathers:  # FSDP2 / ZeRO-3: the peak can sit at a layer's all-gather (sharding.py)
            forward.append(phase(big + n_states + n_act + 3, **with_extra(
                ranked.forward_layer(saved, int(act.layer_bytes * k), recomputed),
                weights=W, optimizer_state=O, temporaries=fb_temps)))
        phases[Phase.FORWARD] = max(forward, key=lambda c: sum(c.values()))
        # Backward is a line from "all activations saved, no gradients" to "no activations,
        # all gradients", so its peak is at one of three moments: the loss backward (fp32
        # log-softmax gradients), the recomputation of a checkpointed layer, or the end.
        candidates = [
            phase(big + n_states + n_act + 3, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O, activations=saved,
                logits=logits["backward"], temporaries=fb_temps)),
            phase(big + n_states + n_grads, **with_extra(
                ranked.backward_end_extra(), weights=W, optimizer_state=O, gradients=G,
                temporaries=fb_temps - cast_cache + st.embed_bwd)),
        ]
        if recomputed:
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O,
                activations=saved + recomputed, temporaries=fb_temps)))
        if ranked.gathers:  # FSDP2 / ZeRO-3: the peak can sit inside a layer's backward
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_layer(saved, int(act.layer_bytes * k), layer_working_set(spec, setup),
                                      recomputed),
                weights=W, optimizer_state=O, temporaries=fb_temps)))
        phases[Phase.BACKWARD] = max(candidates, key=lambda c: sum(c.values()))
        phases[Phase.OPTIMIZER] = phase(big + n_grads + 2 * n_states, **with_extra(
            ranked.optimizer_extra(), weights=W, gradients=G + st.master_grads, optimizer_state=O,
            temporaries=workspace + st.opt_temps + overheads.constant_bytes))
    else:
        kv = kv_cache_bytes(spec, setup, setup.seq + setup.new_tokens)
        prefill_kv = kv_cache_bytes(spec, setup, setup.seq)
        phases[Phase.PREFILL] = phase(big + 2 * spec.num_layers + 4, weights=W, kv_cache=prefill_kv,
                                      activations=int(k * prefill_transient(spec, setup)),
                                      logits=setup.batch * spec.vocab_size * setup.precision.compute_bytes,
                                      temporaries=workspace + overheads.constant_bytes)
        if setup.new_tokens:
            # DynamicCache.update concatenates per layer: one layer's old and new cache coexist
            growth = kv // max(spec.num_layers, 1)
            phases[Phase.DECODE] = phase(big + 2 * spec.num_layers + 2, weights=W, kv_cache=kv + growth,
                                         logits=setup.batch * spec.vocab_size * setup.precision.compute_bytes,
                                         temporaries=workspace + overheads.constant_bytes)
    peak = max(phases, key=lambda ph: sum(phases[ph].values()))
    return Estimate(model=spec.name, setup=setup, params=count.total, trainable_params=states.trainable,
                    peak_phase=peak, phases=phases, param_groups=dict(count.groups),
                    notes=tuple(notes), overheads_source=overheads.source,
                    calibration_key=group)


class _StaticKey(NamedTuple):
    """The parts of a setup (and of the overheads) that batch and sequence do not touch."""

    mode: Mode
    precision: Precision
    quant: Quant
    optimizer: Optimizer
    optimizer_impl: OptimizerImpl
    lora_rank: int
    lora_targets: tuple
    device: Device
    world_size: int
    sharding: Sharding
    workspace: int
    context: int
    per_tensor: int

    @property
    def resolved_optimizer_impl(self) -> OptimizerImpl:
        return Setup.resolved_optimizer_impl.fget(self)  # type: ignore[attr-defined]


class _Static(NamedTuple):
    states: ModelStates
    weights: int
    gradients: int
    optimizer_state: int
    ranked: RankStates
    workspace: int
    context: int
    per_tensor: int
    big: int
    n_states: int
    n_grads: int
    cast_cache: int
    embed_bwd: int
    master_grads: int
    opt_temps: int


@lru_cache(maxsize=4096)
def _static(spec: ModelSpec, key: _StaticKey) -> _Static:
    """Every term of the estimate that batch and sequence length do not change."""
    states = _model_states(spec, _StateKey(key.mode, key.precision, key.quant, key.optimizer,
                                           key.lora_rank, key.lora_targets))
    ranked = per_rank_states(spec, key, states)  # key has the Setup fields it reads
    full = key.mode is Mode.FULL
    # live tensors over 1 MiB, for the allocator's rounding slack (overheads.py)
    big = _large_tensors(spec, key.precision.param_bytes)
    # autocast caches the half copy of every matmul weight; autograd keeps them saved
    # until backward frees them (torch/csrc/autograd autocast cache, torch.autocast docs)
    cast_cache = 2 * states.linear_weights if key.precision.is_autocast and full else 0
    # At the end of backward a tied embedding's dense (V, h) gradient and its sum with the
    # lm_head's gradient coexist with the accumulated .grad (measured by the sim backend;
    # an untied embedding's gradient is stolen into .grad without a copy).
    grad_bytes = states.gradients // max(states.trainable, 1) if full else 0
    embed_bwd = 2 * spec.vocab_size * (spec.embed_dim or spec.hidden_size) * grad_bytes \
        if spec.tie_word_embeddings else 0
    # mixed-bf16: the fp32 copy of every gradient the master step reads
    master_grads = FP32 * states.trainable if key.precision is Precision.MIXED_BF16 and full else 0
    opt_temps = optimizer_temporaries(key, states) if key.mode is not Mode.INFERENCE else 0
    if key.sharding in _SHARDED_STATES:
        # each rank steps only its shard of the master weights and states (ZeRO Sec. 5)
        master_grads = -(-master_grads // key.world_size)
        opt_temps = -(-opt_temps // key.world_size)
    return _Static(states, ranked.weights, ranked.gradients, ranked.optimizer_state,
                   ranked, key.workspace, key.context, key.per_tensor, big,
                   big * _STATE_TENSORS[key.optimizer] if full else 0, big if full else 0,
                   cast_cache, embed_bwd, master_grads, opt_temps)


@lru_cache(maxsize=1024)
def _group(family: str, attn, precision) -> str:
    return calibration_key(family, attn.value, precision.value)


@lru_cache(maxsize=1024)
def _large_tensors(spec: ModelSpec, param_bytes: int) -> int:
    limit = 2**20 // param_bytes
    return sum(1 for x in param_tensor_sizes(spec) if x > limit)


def kv_cache_bytes(spec: ModelSpec, setup: Setup, tokens: int) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * batch * tokens * bytes (REFERENCE.md)."""
    return 2 * spec.num_layers * spec.kv_dim * setup.batch * tokens * setup.precision.compute_bytes


def prefill_transient(spec: ModelSpec, setup: Setup) -> int:
    """Working set of one layer during the no-grad prefill: the residual stream and the
    larger of the MLP (act(gate), up and their product) and the attention core."""
    T = setup.batch * setup.seq
    p = setup.precision.compute_bytes
    h, f = spec.hidden_size, spec.intermediate_size
    resid = 2 * p * h * T  # residual + normed input
    mlp = (3 if spec.gated_mlp else 2) * p * f * T
    if setup.attn.value == "eager":
        attn = (FP32 + p) * spec.num_heads * setup.seq * T + 2 * p * spec.q_dim * T
    else:
        attn = p * (2 * spec.q_dim + 2 * spec.kv_dim) * T
    return resid + max(mlp, attn)
