"""estimate(): bytes per Category at the peak of a step, and the phase where it falls.

Model states follow ZeRO (Rajbhandari et al. 2019, Sec. 3: mixed-precision Adam keeps
2 + 2 + 12 bytes/param) and PyTorch's optimizers (state in the parameter's dtype);
activations come from ``activations.py``; overheads from ``overheads.py``.
Each phase's resident set is computed separately and the largest is the peak.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache, partial
from typing import NamedTuple

from . import activations as acts
from . import caches, dpo, grpo, kernels
from .allocations import replay_estimate
from .archs import MLP, arch_of, inventory_of, registered_types, traits
from .categories import TENSOR_CATEGORIES, Category, Phase
from .gpus import GPU
from .logits import logits_bytes
from .modelspec import ModelSpec
from .nontensor import NonTensor, Source, non_tensor
from .optimizer import STATE_TENSORS, optimizer_state_bytes, optimizer_temporaries, paged_state_bytes
from .overheads import DEFAULT, Overheads, calibration_key, workspace_for
from .params import (
    FALLBACK_ERROR_RANGE,
    count_params,
    layer_linears,
    lora_params,
    lora_targets,
    param_tensor_sizes,
    quant_state_bytes,
    quantized_params,
)
from .setup import (
    Device,
    KbitPrep,
    Loop,
    Loss,
    Mode,
    Optimizer,
    OptimizerImpl,
    Precision,
    Quant,
    Setup,
    Sharding,
    Trainer,
)
from .sharding import RankStates, layer_working_set, per_rank_states, with_extra
from .trainers import input_leaf_bytes, step_setup
from .units import FP32, HALF, MiB

_CATEGORY = {c.value: c for c in Category}
_PhaseMap = dict[Phase, dict[Category, int]]
_ZERO = dict.fromkeys(Category, 0)  # iterating an Enum is slow: copy this template instead
_CONTEXT, _ALLOCATOR, _TEMPORARIES = Category.CONTEXT, Category.ALLOCATOR, Category.TEMPORARIES
_SHARDED_STATES = (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FSDP, Sharding.FSDP1,
                   Sharding.FSDP1_GRAD_OP)



@dataclass(frozen=True)
class Reserved:
    """What the replay of an estimate's allocation sequence adds to its tensors: every
    phase with its allocator and context bytes, the load phase, the first step's peaks, and the
    memory outside the allocator by source."""

    phases: dict[Phase, dict[Category, int]]
    load_phase: dict[Category, int] | None
    non_tensor: dict[str, dict]
    #: the first step's replayed peaks per phase (None without a replay), and the context bytes
    first_peaks: dict | None
    context: int


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per category at the peak phase, and every phase's breakdown.

    The tensors come with the estimate; the allocator's and the context's bytes (reserved
    memory and NVML's view) come from replaying the estimate's allocation sequence
    (estimator/allocations.py), done the first time something asks for them."""

    model: str
    setup: Setup
    params: int
    trainable_params: int
    peak_phase: Phase
    #: every phase's tensors (and the analytic allocator and context terms the phases were
    #: chosen by); :attr:`phases` has the replayed allocator and context instead
    tensor_phases: dict[Phase, dict[Category, int]]
    param_groups: dict[str, int] = field(default_factory=dict)
    notes: tuple = ()
    overheads_source: str = DEFAULT.source
    calibration_key: str = ""
    #: builds the first optimizer step's tensor phases (optimizer state is made in the first
    #: ``step()``; kept gradients exist from the first backward) when asked: most callers
    #: (fit's scans, the tables) never read them (:attr:`first_step_tensor_phases`)
    first_step: Callable[[], _PhaseMap] | None = field(default=None, compare=False, repr=False)
    #: makes :class:`Reserved` (a partial of :func:`_reserved`; None: the phases as they are)
    replay: Callable[[], Reserved] | None = field(default=None, repr=False, compare=False)

    @cached_property
    def reserved(self) -> Reserved:
        if self.replay is None:
            return Reserved(self.tensor_phases, None, {}, None, 0)
        return self.replay(self.tensor_phases)

    @property
    def phases(self) -> dict[Phase, dict[Category, int]]:
        return self.reserved.phases

    @property
    def first_step_tensor_phases(self) -> _PhaseMap | None:
        """The first step's tensor phases where they differ from the steady state, else None."""
        if "_first" not in self.__dict__:
            first = self.first_step() if self.first_step is not None else None
            if first is not None:
                _check_non_negative(self.model, first)
            object.__setattr__(self, "_first", None if first == self.tensor_phases else first)
        return self.__dict__["_first"]

    @property
    def first_step_phases(self) -> dict[Phase, dict[Category, int]] | None:
        """The first step's phases, with the allocator and context bytes its replay gives."""
        first = self.first_step_tensor_phases
        if first is None or self.reserved.first_peaks is None:
            return first
        return _with_replay(first, self.reserved.first_peaks, self.reserved.context)

    @property
    def load_phase(self) -> dict[Category, int] | None:
        """Loading the model, a phase of its own before the first step (CUDA): the weights, a
        quantize-on-load staging copy (temporaries), what the load leaves cached (allocator)."""
        return self.reserved.load_phase

    @property
    def non_tensor(self) -> dict[str, dict]:
        """Memory outside the caching allocator by source (estimator/nontensor.py): the
        context category's parts, each ``{"bytes": n, "source": label}``."""
        return self.reserved.non_tensor

    @property
    def components(self) -> dict[Category, int]:
        return self.phases[self.peak_phase]

    def _all_phases(self) -> list[dict[Category, int]]:
        return list(self.phases.values()) + ([self.load_phase] if self.load_phase else [])

    @property
    def total_bytes(self) -> int:
        """Everything on the device at its highest: tensors, the allocator's cache and the memory
        outside it (NVML's view), the largest over the phases (reserved memory only grows
        within a step, so it peaks late, often after the tensors)."""
        return max(sum(c.values()) for c in self._all_phases())

    @property
    def allocated_bytes(self) -> int:
        """The part ``torch.cuda.max_memory_allocated`` counts: live tensors."""
        return sum(v for k, v in self.tensor_phases[self.peak_phase].items() if k in TENSOR_CATEGORIES)

    @property
    def reserved_bytes(self) -> int:
        """What ``torch.cuda.max_memory_reserved`` says: the largest over the phases (the
        load's included) of tensors plus the allocator's cache."""
        return max(sum(v for k, v in c.items() if k is not Category.CONTEXT) for c in self._all_phases())

    @property
    def reserved_phase(self) -> str:
        """The phase where reserved memory peaks (``load`` for the model's load)."""
        if self.load_phase and sum(v for k, v in self.load_phase.items() if k is not Category.CONTEXT) \
                >= self.reserved_bytes:
            return Phase.LOAD.value
        return max(self.phases, key=lambda ph: sum(v for k, v in self.phases[ph].items()
                                                   if k is not Category.CONTEXT)).value

    @property
    def non_tensor_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.non_tensor.values())

    def runs_within(self, capacity_bytes: int) -> bool:
        """Whether the step runs when the caching allocator may reserve at most
        ``capacity_bytes``: its allocation sequence replayed under that capacity, a refused
        cudaMalloc freeing the cached blocks and retrying as the allocator does
        (estimator/allocator.py), runs out of nothing. Without a replay (the cpu device),
        whether the tensors fit."""
        if capacity_bytes <= 0 or self.allocated_bytes > capacity_bytes:
            return False
        if self.replay is None or self.reserved_bytes <= capacity_bytes:
            return True
        spec, setup, st, k = self.replay.args[:4]
        return not replay_estimate(spec, setup, st, k, capacity_bytes).oom

    @property
    def first_step_peak_phase(self) -> Phase:
        phases = self.first_step_tensor_phases or self.tensor_phases
        return max(phases, key=lambda ph: _tensor_bytes(phases[ph]))

    @property
    def first_step_allocated_bytes(self) -> int:
        phases = self.first_step_tensor_phases or self.tensor_phases
        return sum(v for k, v in phases[self.first_step_peak_phase].items() if k in TENSOR_CATEGORIES)

    def to_dict(self) -> dict:
        first = None
        if self.first_step_phases is not None:
            first = {"peak_phase": self.first_step_peak_phase.value,
                     "allocated_bytes": self.first_step_allocated_bytes,
                     "total_bytes": sum(self.first_step_phases[self.first_step_peak_phase].values()),
                     "phases": {ph.value: {c.value: comp.get(c, 0) for c in Category}
                                for ph, comp in self.first_step_phases.items()}}
        return {
            "model": self.model,
            "total_bytes": self.total_bytes,
            "allocated_bytes": self.allocated_bytes,
            "reserved_bytes": self.reserved_bytes,
            "peak_phase": self.peak_phase.value,
            "reserved_phase": self.reserved_phase,
            "non_tensor": {k: dict(v) for k, v in self.non_tensor.items()},
            "load": None if self.load_phase is None else {c.value: self.load_phase.get(c, 0) for c in Category},
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
            "first_step": first,
        }


@dataclass(frozen=True)
class ModelStates:
    weights: int
    gradients: int
    optimizer_state: int
    trainable: int
    largest_trainable_tensor: int  # elements
    linear_weights: int  # elements of matmul weights (autocast casts them)


def _trainable_tensor_sizes(spec: ModelSpec, setup: Setup) -> list[int]:
    """Element counts of the trainable parameter tensors."""
    if setup.mode in (Mode.LORA, Mode.QLORA):
        per_layer: list[int] = []
        for lin in lora_targets(spec, setup.lora_targets):
            per_layer += [setup.lora_rank * lin.in_features, setup.lora_rank * lin.out_features]
        return per_layer * spec.num_layers
    return param_tensor_sizes(spec)


def model_states(spec: ModelSpec, setup: Setup) -> ModelStates:
    """Weights, gradients and optimizer state in bytes (unsharded); batch and seq play no part."""
    return _model_states(spec, setup.shape_free)


@lru_cache(maxsize=4096)
def _model_states(spec: ModelSpec, key: Setup) -> ModelStates:
    n = count_params(spec).total
    prec = key.precision
    linear_weights = sum(l.copies * l.in_features * l.out_features for l in layer_linears(spec)) \
        * spec.num_layers + spec.vocab_size * (spec.embed_dim or spec.hidden_size)
    weights = _weight_bytes(spec, key, n) + _buffer_bytes(spec, key)
    if not key.training:
        return ModelStates(weights, 0, 0, 0, 0, linear_weights)
    if key.mode in (Mode.LORA, Mode.QLORA):
        trainable = lora_params(spec, key.lora_targets, key.lora_rank)
        # peft autocast_adapter_dtype=True keeps adapters fp32; TRL casts a quantized model's to bf16
        weights += key.adapter_bytes * trainable
        state_bytes = grad_bytes = key.adapter_bytes
    else:
        trainable = n
        grad_bytes = prec.param_bytes  # .grad has the parameter's dtype
        # torch.optim keeps state in the parameter's dtype; mixed-bf16 keeps fp32 states
        state_bytes = FP32 if prec is Precision.MIXED_BF16 else prec.param_bytes
    sizes = _trainable_tensor_sizes(spec, key)
    return ModelStates(weights, trainable * grad_bytes, optimizer_state_bytes(spec, key, trainable, state_bytes, sizes),
                       trainable, max(sizes, default=0), linear_weights)


def _buffer_bytes(spec: ModelSpec, key: Setup) -> int:
    """Non-parameter buffers that take memory (the family's hook, estimator/archs: GPT-2's
    per-layer causal mask before 4.51, older Qwen2's and Mixtral's per-layer rotary tables,
    GPT-NeoX's own attention's buffers before 4.49)."""
    return arch_of(spec).buffer_bytes(spec, traits(spec, key), key.precision.param_bytes)


def _weight_bytes(spec: ModelSpec, key: Setup, n: int) -> int:
    if key.quant is Quant.NONE:
        return n * key.precision.param_bytes
    q_elems, q_rows, q_bias = quantized_params(spec, key.semantics.moe_experts_fused)
    rest = n - q_elems - q_bias
    packed = q_elems if key.quant is Quant.INT8 else q_elems // 2  # int8, or two 4-bit values a byte
    if key.quant is not Quant.INT8 and key.shards_params and key.resolved_kbit_prep is KbitPrep.PEFT \
            and key.semantics.kbit_prep_casts_packed_storage and key.precision.compute_bytes == HALF:
        packed *= 2  # peft < 0.10 casts the 16-bit storage of the packed weights to fp32 (versions.py)
    qbytes = packed + quant_state_bytes(spec, key.quant, key.semantics.moe_experts_fused)
    # the other modules in the loaded dtype, fp32 after peft's preparation (Setup.stream_precision);
    # a 4-bit linear casts its bias to its compute dtype in its first forward (bitsandbytes 0.50.2
    # nn/modules.py:630-635 ``bias.data = bias.data.to(x.dtype)``), an 8-bit one to its input's
    # (Linear8bitLt.forward)
    bias = key.precision.compute_bytes if key.quant is not Quant.INT8 else key.stream_precision.param_bytes
    return qbytes + key.stream_precision.param_bytes * rest + bias * q_bias


class _Phases:
    """Builds one phase's bytes per category: tensors as given, plus the context and the
    allocator's rounding (per large tensor, or a fitted fraction of the tensors)."""

    __slots__ = ("context", "per_tensor", "fraction", "cuda")

    def __init__(self, st: _Static, overheads: Overheads, cuda: bool):
        self.context, self.per_tensor, self.cuda = st.context, st.per_tensor, cuda
        self.fraction = overheads.allocator_fraction

    def __call__(self, tensors: int, **parts: int) -> dict[Category, int]:
        out = _ZERO.copy()
        for key, value in parts.items():
            out[_CATEGORY[key]] = int(value)
        if out[_TEMPORARIES] < 0:
            # a negative calibration constant (calibrate.py fits it to the phase's total): what
            # the temporaries cannot give is taken from the largest tensor term, so the total
            # keeps the fitted correction and no category goes below zero
            deficit, out[_TEMPORARIES] = -out[_TEMPORARIES], 0
            largest = max(TENSOR_CATEGORIES, key=out.__getitem__)
            out[largest] = max(out[largest] - deficit, 0)
        out[_CONTEXT] = self.context
        if self.fraction is None or not self.cuda:
            out[_ALLOCATOR] = self.per_tensor * tensors
        else:
            out[_ALLOCATOR] = int(self.fraction * sum(v for c, v in out.items() if c in TENSOR_CATEGORIES))
        return out


def estimate(spec: ModelSpec, setup: Setup, gpu: GPU | None = None,
             overheads: Overheads = DEFAULT) -> Estimate:
    """Predict the peak memory of one step of ``setup`` on ``spec``: bytes per category in
    every phase, and the phase where the peak falls.

        >>> from estimator.modelspec import load_model
        >>> from estimator.setup import Setup
        >>> est = estimate(load_model("llama-2-7b"), Setup(mode="lora", precision="bf16", batch=4, seq=1024))
        >>> est.peak_phase.value, round(est.allocated_bytes / 2**30, 1)
        ('backward', 34.3)
    """
    if setup.trainer is Trainer.DPO:
        spec = dpo.without_dropout(spec)  # DPOConfig's disable_dropout (estimator/dpo.py)
    limit, why = arch_of(spec).position_limit(spec, setup.rope_scaling)
    longest = setup.seq + setup.new_tokens + (setup.max_completion or 0)  # GRPO's prompt + completion
    if limit and longest > limit:
        raise ValueError(f"seq {longest} is beyond {spec.name}'s {limit} positions ({why})")
    if not spec.has_formula and not setup.allow_llama_fallback:
        count_params(spec)  # a type transformers cannot build is told so first (archs/meta.py)
        raise NoFormula(spec)
    gap = arch_of(spec).memory_gap(spec, setup)  # a family in the registry whose terms for it are not written
    if gap:
        raise NotModelled(gap)
    refusal = arch_of(spec).refuse(spec, setup)  # a setup transformers cannot build for this family
    if refusal:
        raise ValueError(refusal)
    # the shape the step sees: --packing packed / padding-free flatten the batch (trainers.step_setup)
    given, setup = setup, step_setup(setup)
    count = count_params(spec)
    group = _group(traits(spec, setup).family, setup.attn, setup.precision)
    cuda = setup.device is Device.CUDA
    # one cuBLAS workspace per handle and stream (CublasHandlePool.cpp), handles per thread:
    # training adds autograd's CUDA device thread (torch/csrc/autograd/engine.cpp), whose
    # workspace, made in the first backward, stays; inference has the forward's only
    workspaces = 2 if setup.training else 1
    st = _static(spec, setup.shape_free,
                 workspaces * (workspace_for(gpu.architecture) if gpu else overheads.workspace_bytes) if cuda else 0,
                 overheads.context_bytes if cuda else 0, overheads.allocator_per_large_tensor_bytes if cuda else 0)
    phase = _Phases(st, overheads, cuda)
    k = overheads.factor_for(group)
    first = None
    if setup.training:
        # what the forward and backward hold follows the unquantized parameters' dtype: fp32 after
        # peft's k-bit preparation (Setup.stream_precision); the model states follow the setup
        flow = setup if setup.stream_precision is setup.precision else setup.replace(precision=setup.stream_precision)
        build = {Trainer.DPO: partial(_dpo_phases, loaded=setup),
                 Trainer.GRPO: _grpo_phases}.get(setup.trainer, _training_phases)
        phases, first = build(spec, flow, st, k, overheads.constant_bytes, phase)
    elif setup.mode is Mode.EVAL:
        phases = _eval_phases(spec, setup, st, k, overheads.constant_bytes, phase)
    else:
        phases = _inference_phases(spec, setup, st, k, overheads.constant_bytes, phase)
    _check_non_negative(spec.name, phases)
    # the phase whose live tensors are most (max_memory_allocated's peak): the analytic
    # allocator and context terms the phases carry until the replay replaces them must not
    # choose it (a phase of many small tensors, the optimizer's, would win on its rounding)
    peak = max(phases, key=lambda ph: _tensor_bytes(phases[ph]))
    notes = tuple(n for n in (count.note, _ignored_note(spec), arch_of(spec).checkpoint_note(spec),
                              _fsdp1_adapter_units_note(setup)) if n)
    # DPO: the replay runs the policy's step at twice the batch; it does not know the reference's
    # copy or forward, so its reserved figure is a floor under the phases' tensors (_with_replay)
    # GRPO: the replay runs the training step at prompt + completion; generation, before it, is not
    # replayed (its phase keeps the analytic allocator term)
    replayed = {Trainer.DPO: dpo.policy_setup, Trainer.GRPO: grpo.training_setup}.get(setup.trainer,
                                                                                       lambda s: s)(setup)
    replay = partial(_reserved, spec, replayed, st, k, gpu, overheads) if cuda else None
    return Estimate(model=spec.name, setup=given, params=count.total, trainable_params=st.states.trainable,
                    peak_phase=peak, tensor_phases=phases, param_groups=dict(count.groups),
                    notes=notes, overheads_source=overheads.source,
                    calibration_key=group, first_step=first, replay=replay)


def _reserved(spec: ModelSpec, setup: Setup, st: _Static, k: float, gpu: GPU | None, overheads: Overheads,
              phases: _PhaseMap) -> Reserved:
    """The allocator and context categories from the replay of the estimate's own
    allocation sequence (estimator/allocations.py) and the non-tensor sources
    (estimator/nontensor.py): each phase's allocator bytes are what the replay reserved
    there beyond the phase's tensors. The phases' tensors are left as they are; the first
    step's replayed peaks are kept for its phases, built when asked."""
    replay = replay_estimate(spec, setup, st, k)
    outside = non_tensor(setup, gpu, overheads)
    paged = paged_state_bytes(setup, _trainable_tensor_sizes(spec, setup)) if setup.training else 0
    if paged:
        # a paged 8-bit optimizer's state buffers sit in unified memory: device memory beside
        # the allocator's, outside reserved (estimator/optimizer.py paged_state_bytes)
        label = ("PagedAdamW8bit state buffers in CUDA unified memory (cudaMallocManaged; "
                 "estimator/optimizer.py paged_state_bytes)")
        outside = NonTensor(outside.sources + (Source("paged_optimizer_state", paged, label),))
    context = outside.total
    load = _ZERO.copy()
    load[Category.WEIGHTS] = st.weights
    load[_TEMPORARIES] = max(replay.load.allocated - st.weights, 0)  # a quantize-on-load staging copy
    load[_ALLOCATOR] = max(replay.load.reserved - load[Category.WEIGHTS] - load[_TEMPORARIES], 0)
    load[_CONTEXT] = context
    return Reserved(_with_replay(phases, replay.steady, context), load, outside.to_dict(), replay.first, context)


def _with_replay(ph_map: _PhaseMap, peaks, context: int) -> _PhaseMap:
    """``ph_map`` with each phase's allocator bytes what the replay reserved there beyond its
    tensors, and the context the non-tensor sources' total."""
    out = {}
    for ph, comp in ph_map.items():
        comp = dict(comp)
        tensors = sum(v for c, v in comp.items() if c in TENSOR_CATEGORIES)
        # DPO's reference forward is not replayed (estimator/dpo.py): it follows the policy's
        # forward within the step, and reserved memory never falls there (no empty_cache between),
        # so the forward's replayed reserved is its floor
        replayed = peaks.get(ph) or (peaks.get(Phase.FORWARD) if ph is Phase.REFERENCE else None)
        if replayed is not None:
            comp[_ALLOCATOR] = max(replayed.reserved - tensors, 0)
        comp[_CONTEXT] = context
        out[ph] = comp
    return out


def _tensor_bytes(comp: dict[Category, int]) -> int:
    return sum(v for c, v in comp.items() if c in TENSOR_CATEGORIES)


class NoFormula(ValueError):
    """A model type outside the registry, refused: one sentence naming it and the ways on."""

    def __init__(self, spec: ModelSpec):
        super().__init__(
            f"model_type {spec.model_type!r} ({spec.name}) has no formula here (families: "
            f"{', '.join(registered_types())}); measure it with `vramlab profile {spec.source or spec.name} "
            f"--backend sim` (any transformers causal LM, CUDA semantics, no GPU), or pass --allow-llama-fallback "
            f"for the Llama-style terms, {FALLBACK_ERROR_RANGE}")


class NotModelled(ValueError):
    """A family in the registry whose parameters are exact but whose memory terms are not all
    written (Arch.memory_gap): refused in one sentence; the profiler measures it without an
    estimate beside it, as it does a model type without a formula."""


def _check_non_negative(model: str, phases) -> None:
    """A negative byte count is a bug in a term, never a result: an internal error (exit 1)."""
    for ph, comp in phases.items():
        for cat, value in comp.items():
            if value < 0:
                raise RuntimeError(f"internal error: the estimate of {model} has {value} bytes of "
                                   f"{cat.value} in {ph.value}; please report it with the command line")


def assumed_versions(spec: ModelSpec, setup: Setup) -> dict:
    """What an estimate assumed of the libraries: the versions, their generic switches, and
    the traits of this model's family resolved for them (``--json``'s ``assumed_versions``)."""
    return dict(setup.semantics.to_dict(), traits=traits(spec, setup).to_dict())


def _fsdp1_adapter_units_note(setup: Setup) -> str:
    """FSDP1 with adapters: the estimate's unit layout (setup.FsdpWrap), and the other one."""
    if setup.sharding not in (Sharding.FSDP1, Sharding.FSDP1_GRAD_OP) or setup.mode not in (Mode.LORA, Mode.QLORA):
        return ""
    if setup.layer_units:
        return ("FSDP1 units: decoder layers only (--fsdp-wrap layers): each layer's flat parameter mixes frozen "
                "weights and adapters, so FSDP1 (use_orig_params) keeps gradients for the whole layer and every "
                "base linear and norm saves what full training saves; the optimizer state is the busiest rank's")
    # measured on gloo ranks: SmolLM2-135M fp32 LoRA b2 x s256, 2 ranks, backward +17 % with layer units
    # (results/distributed/cpu-fsdp.jsonl, README "More than one GPU")
    return ("FSDP1 units as the Trainer wraps a peft model (peft's fsdp_auto_wrap_policy: each adapter a unit "
            "of its own); a loop that wraps decoder layers only (accelerate's TRANSFORMER_BASED_WRAP alone, the "
            "Trainer before transformers 4.40) keeps gradients for the frozen weights too: pass --fsdp-wrap layers")


def _ignored_note(spec: ModelSpec) -> str:
    if not spec.ignored_keys:
        return ""
    return (f"ignored config keys that would load code or kernels: {', '.join(spec.ignored_keys)} "
            f"(the attention implementation comes from --attn; remote code never runs)")


def _resident_gradients(setup: Setup, st: _Static, first_step: bool) -> int:
    """Gradients that exist before the worst micro-batch's backward: from the second
    micro-batch of gradient accumulation, and in every step after the first when
    ``zero_grad(set_to_none=False)`` keeps them (torch/optim/optimizer.py: zero_grad). Under
    FSDP2 a micro-batch without gradient sync (``set_requires_gradient_sync(False)``, what
    accelerate's no_sync does) accumulates *unsharded* gradients
    (torch 2.13: torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py:605-611,
    post_backward skips the reduce-scatter; _fsdp_param.py:802-815,
    to_accumulated_grad_if_needed / accumulate_unsharded_grad_if_needed), all of them at once."""
    accumulating = setup.grad_accum > 1
    if not accumulating and not (setup.keep_grads and not first_step):
        return 0
    if accumulating and st.ranked.gathers:
        # FSDP1's no_sync likewise keeps each flat parameter's unsharded gradient
        # (torch/distributed/fsdp/_runtime_utils.py _post_backward_hook: no _reduce_grad)
        return st.states.gradients
    return st.gradients


def _training_phases(spec: ModelSpec, setup: Setup, st: _Static, k: float, constant: int,
                     phase: _Phases) -> tuple[_PhaseMap, Callable[[], _PhaseMap] | None]:
    """Forward, backward and optimizer step of a training step, each at its peak moment: of
    the steady state, and of the first step where it differs (optimizer state, which
    torch.optim makes in the first ``step()``, does not exist before it; mixed-bf16's master
    weights do; kept gradients exist from the first backward; a held loop's previous
    outputs from the second step). The terms both share are computed once."""
    W, G, O = st.weights, st.gradients, st.optimizer_state
    G_layer = _layer_gradients(spec, setup, st)
    merged_experts = int(acts.lora_expert_weights(spec, setup) * k) if setup.grad_ckpt else 0
    ranked = st.ranked  # per rank: ZeRO Table 1, DDP buckets, FSDP2 gathering (sharding.py)
    big, n_states, n_grads = st.big, st.n_states, st.n_grads
    act = acts.checkpointed_activations(spec, setup) if setup.grad_ckpt else acts.training_activations(spec, setup)
    A = int(act.total * k) + int(k * input_leaf_bytes(spec, setup))  # TRL's peft input leaf (trainers.py)
    logits = {ph: int(v * k) for ph, v in logits_bytes(spec, setup).items()}
    fb_temps = st.workspace + st.cast_fwd + constant
    bwd_temps = st.workspace + st.cast_bwd + constant
    recompute_temps = bwd_temps + st.cast_layer  # a recomputed layer casts its weights again
    n_act = len(act.per_layer) * act.layers + len(act.outside)
    recomputed = act.outside.get("recomputed_layer", 0)
    saved = A - recomputed
    # the model's outputs: a KV cache when the forward builds one, and in a hand-written loop
    # the logits, both alive until the outputs are dropped: before backward in the Trainer's
    # loop, after it otherwise. Attention saves much of the cache anyway (caches.cache_beside_saved);
    # once backward has freed the saved tensors, a held cache is all there
    # (an old tuple cache holds attention's own tensors: nothing beside them until backward
    # frees them, caches.tuple_cache_bytes after)
    full_cache = kv_cache_bytes(spec, setup, setup.seq) \
        if caches.dynamic_cache(spec, setup) and not setup.grad_ckpt else 0
    cache = int(full_cache * caches.cache_beside_saved(spec, setup)) or caches.tuple_cache_beside_saved(spec, setup)
    manual = setup.loop in (Loop.MANUAL, Loop.HELD)
    held_logits = setup.batch * setup.seq * spec.vocab_size * setup.precision.compute_bytes if manual else 0
    held_kv, held_kv_end = (cache, full_cache or caches.tuple_cache_bytes(spec, setup)) if manual else (0, 0)
    # the CausalLM forward holds the model's ``last_hidden_state`` (the final norm's output) while its
    # head and loss run (transformers 5.24 e.g. modeling_llama.py:469-475, modeling_glm4_moe.py:608-615),
    # a tensor of its own where the head saves none (a frozen head: LoRA). Measured on the CUDA sim, the
    # forward's loss moment: GLM-4.5-Air / DeepSeek-V3 reduced LoRA with checkpointing -1.09 / -1.07 %
    # without it, SmolLM2-135M 4 layers LoRA q/v with checkpointing -0.94 %; without checkpointing
    # -0.20 % in bf16 (the Trainer's loop or a hand-written one) and -0.33 % in fp32, -0.02 / -0.04 %
    # with it. TRL's trainers run their own head (logits.chunked_nll_bytes counts its input)
    last_hidden = setup.batch * setup.seq * spec.hidden_size * acts._dtypes(setup)[1] \
        if "head_input" not in act.outside and setup.trainer.value == "hf" else 0
    # Loop.HELD: the previous step's outputs live until this step's forward returns (not in step 1)
    held = setup.loop is Loop.HELD
    def build(first_step: bool) -> dict[Phase, dict[Category, int]]:
        O_fwd = O if not first_step else st.master_weights
        R = _resident_gradients(setup, st, first_step)
        prev_logits, prev_kv = (held_logits, held_kv_end) if held and not first_step else (0, 0)
        phases: dict[Phase, dict[Category, int]] = {}
        # The forward's peak is at the loss: every saved activation, the logits and the loss's
        # buffers; a checkpointed layer's full set exists only while backward recomputes it.
        forward = [phase(big + n_states + n_act + 3 + 2 * bool(prev_logits), **with_extra(
            ranked.forward_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved + last_hidden,
            logits=logits["forward"] + prev_logits, kv_cache=cache + prev_kv, temporaries=fb_temps))]
        if ranked.flat and G and not first_step:
            # FSDP1 frees the flat gradient shards only at the next forward's root pre-forward
            # (_runtime_utils.py _root_pre_forward -> _reset_flat_param_grad_info_if_needed: with
            # use_orig_params, zero_grad(set_to_none) clears the views' .grad only)
            forward.append(phase(big + n_states + n_grads, weights=W, optimizer_state=O_fwd, gradients=max(G, R),
                                 temporaries=st.workspace + constant))
        if ranked.gathers:  # FSDP2 / ZeRO-3: the peak can sit at a layer's all-gather (sharding.py)
            forward.append(phase(big + n_states + n_act + 3, **with_extra(
                ranked.forward_layer(saved, int(act.layer_bytes * k), recomputed),
                weights=W, optimizer_state=O_fwd, gradients=R, temporaries=fb_temps)))
        if setup.grad_ckpt:
            # inside a checkpointed layer's forward: it saves nothing for backward, but its
            # working set is there as in a no-grad forward (prefill_transient: at long sequences
            # eager attention's scores and softmax), beside every earlier layer's input
            forward.append(phase(big + n_states + n_act + 3, **with_extra(
                ranked.forward_extra(), weights=W, optimizer_state=O_fwd, gradients=R,
                activations=saved - int(act.outside.get("final_norm", 0) * k)
                - int(act.outside.get("head_input", 0) * k) + int(k * prefill_transient(spec, setup))
                - int(act.outside.get("eager_mask", 0) * k),  # the transient counts the mask it holds
                kv_cache=cache + prev_kv, temporaries=fb_temps)))
        scores = _last_layer_sink_scores(spec, setup, act, k, saved)
        if scores:  # eager attention with sinks: the last layer's score matrices, before its MLP
            forward.append(phase(big + n_states + n_act + 3, **with_extra(
                ranked.forward_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=scores,
                kv_cache=cache + prev_kv, temporaries=fb_temps)))
        if merged_experts:
            # a checkpointed layer's forward still parametrizes its LoRA expert stacks (one layer's
            # worth, freed when its experts module returns: activations.lora_expert_weights)
            forward.append(phase(big + n_states + n_act + 3, **with_extra(
                ranked.forward_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved,
                kv_cache=cache + prev_kv, temporaries=fb_temps + merged_experts)))
        phases[Phase.FORWARD] = max(forward, key=_tensor_bytes)
        # Backward is a line from "all activations saved, no gradients" to "no activations,
        # all gradients", so its peak is at one of three moments: the loss backward (fp32
        # log-softmax gradients), the recomputation of a checkpointed layer, or the end. With
        # gradients already there, each arrives as a new tensor added into .grad in place
        # (AccumulateGrad): the embedding's dense gradient is the largest such transient.
        end_grads, end_temps = G - st.tied_pending, st.embed_bwd + st.tied_pending
        if R and not ranked.gathers:  # .grad exists: the tied sum is added into it, an untied embedding's too
            end_grads = max(G, R)
            end_temps += st.untied_embed_grad
        # (FSDP2 accumulating: the last micro-batch reduce-scatters the accumulated unsharded
        # gradients layer by layer, so its backward ends with the shards, as without accumulation)
        candidates = [
            phase(big + n_states + n_act + 3, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved,
                logits=logits["backward"] + held_logits, kv_cache=held_kv, temporaries=bwd_temps)),
            phase(big + n_states + n_grads, **with_extra(
                ranked.backward_end_extra(), weights=W, optimizer_state=O_fwd, gradients=end_grads,
                logits=held_logits, kv_cache=held_kv_end, temporaries=st.workspace + constant + end_temps)),
        ]
        if setup.loss is Loss.LOGITS_SUM:
            # logits.sum() saves nothing, so the loss's moment is small and backward's peak can
            # follow the LM head: its weight gradient made (a tied one waits in autograd's input
            # buffer, temporaries, until the embedding's is added; an untied one is .grad), the
            # head's input freed, and the last layer's backward working set (sharding.py)
            head = spec.vocab_size * (spec.embed_dim or spec.hidden_size) * \
                (st.states.gradients // max(st.states.trainable, 1) if setup.mode is Mode.FULL else 0)
            tied = head if spec.tie_word_embeddings else 0
            candidates.append(phase(big + n_states + n_act + 1, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R + head - tied,
                activations=saved - int(act.outside.get("head_input", 0) * k), logits=held_logits, kv_cache=held_kv,
                temporaries=bwd_temps + tied + layer_working_set(spec, setup))))
            if setup.device is Device.CUDA:
                # inside the head's second mm backward (the input's gradient, after the weight's):
                # the contiguous copy of the logits' gradient, the weight gradient and the input
                # gradient (T, e) at once
                e = spec.embed_dim or spec.hidden_size
                candidates.append(phase(big + n_states + n_act + 3, **with_extra(
                    ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved,
                    logits=logits["backward"] + held_logits, kv_cache=held_kv,
                    temporaries=bwd_temps + head + setup.batch * setup.seq * e * setup.precision.compute_bytes)))
        if ranked.gathers and setup.mode is Mode.FULL:
            # FSDP1 / FSDP2 / ZeRO-3: the LM head's weight gradient made while the logits'
            # gradient still exists, beside the root's and the last layer's unsharded parameters
            # (and, accumulating, the unsharded gradients it is added into; sharding.py). The
            # logits' gradient of loss = logits.sum() is a stride-0 expand of one scalar: only
            # CUDA's contiguous copy of it for cuBLAS holds memory (logits.logits_bytes)
            logits_grad = logits["backward"] if setup.loss is Loss.LOGITS_SUM else \
                setup.batch * setup.seq * spec.vocab_size * setup.precision.compute_bytes
            candidates.append(phase(big + n_states + n_act + 2, **with_extra(
                ranked.backward_head_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved,
                logits=logits_grad + held_logits, kv_cache=held_kv, temporaries=bwd_temps)))
        if recomputed:
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R,
                activations=saved + recomputed, logits=held_logits, kv_cache=held_kv, temporaries=recompute_temps)))
        if acts.lora_expert_weights(spec, setup) and not setup.grad_ckpt and not ranked.gathers:
            # LoRA on fused experts: the last layer's expert backward, its saved activations still
            # there, holds the gradient of a parametrized stack (sharding.layer_working_set)
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R, activations=saved,
                logits=held_logits, kv_cache=held_kv, temporaries=bwd_temps + layer_working_set(spec, setup))))
        # what the final norm and the LM head saved is freed by their backward, before any layer's
        # (measured on the sim: SmolLM2-360M-L2 LoRA and QLoRA eager with checkpointing, s4096,
        # the softmax backward of the last layer's recomputation: no final-norm tensor alive)
        head_saved = int((act.outside.get("final_norm", 0) + act.outside.get("head_input", 0)) * k)
        if recomputed and not ranked.gathers:
            # the last layer's recomputation, first in backward: every layer's input still saved,
            # the layer's backward working set beside its recomputed activations, the LM head's
            # gradient made (full training)
            head_grad = spec.vocab_size * (spec.embed_dim or spec.hidden_size) * \
                (st.states.gradients // max(st.states.trainable, 1)) if setup.mode is Mode.FULL else 0
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R + head_grad,
                activations=saved - head_saved + recomputed, logits=held_logits, kv_cache=held_kv,
                temporaries=recompute_temps + layer_working_set(spec, setup))))
        if recomputed and not ranked.gathers and spec.num_layers > 1:
            # the first layer's recomputation, last in backward: every gradient but the first
            # layer's and the input embedding's exists by then (a layer's are made in its own
            # backward), the later layers' inputs are freed, and the layer's backward holds its
            # working set (sharding.layer_working_set) beside its recomputed activations; a tied
            # head's gradient, made first in backward, still waits in autograd's InputBuffer for
            # the embedding's (st.tied_pending, temporaries as at the end; measured on the CUDA
            # sim: SmolLM2-135M 8 layers fp32 full, TRL's chunked loss, b2 x s1024, where sdpa's
            # math kernel makes this layer's backward the peak: -2.55 %, first step -4.03 % without it)
            layer_input = int(act.per_layer.get("layer_input", 0) * k)
            done = max(R, G - G_layer - st.untied_embed_grad - st.embed_bwd // 2)
            candidates.append(phase(big + n_states + n_act, **with_extra(
                ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=done,
                activations=saved - head_saved - (spec.num_layers - 1) * layer_input + recomputed, logits=held_logits,
                kv_cache=held_kv, temporaries=recompute_temps + st.tied_pending + layer_working_set(spec, setup))))
        for first in (False, True) if recomputed and not ranked.gathers else ():
            # a shared expert after the routed ones: the last and the first MoE layer's weighting backward
            # (in the first, a tied head's gradient still waits for the embedding's, as above)
            experts = _recomputed_experts_backward(spec, setup, st, act, k, G, G_layer, R, first)
            if experts:
                candidates.append(phase(big + n_states + n_act + 3, **with_extra(
                    ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=experts[0],
                    activations=saved - head_saved + experts[1], logits=held_logits, kv_cache=held_kv,
                    temporaries=recompute_temps + experts[2] + (st.tied_pending if first else 0))))
        if not recomputed and not ranked.gathers:
            sinks = _last_layer_sink_attention_backward(spec, setup, act, k, saved)
            if sinks:  # eager attention with sinks: the last layer's score gradients, first in backward
                # (full training: the head's, the final norm's and this layer's but q/k/v's gradients made)
                made = _last_layer_gradients(spec, st) if setup.mode is Mode.FULL else 0
                candidates.append(phase(big + n_states + n_act + 3, **with_extra(
                    ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=R + made,
                    activations=sinks[0], logits=held_logits, kv_cache=held_kv, temporaries=bwd_temps + sinks[1])))
        if setup.mode is Mode.FULL and not recomputed and not ranked.gathers and not R:
            # the first layer's backward, last: of autocast's half weight copies only this layer's
            # are still saved (the head's and the later layers' were freed by their backward)
            head_cast = HALF * spec.vocab_size * (spec.embed_dim or spec.hidden_size) if st.cast_bwd else 0
            last_temps = st.workspace + constant + max(st.cast_bwd - head_cast, 0) // max(spec.num_layers, 1)
            expert = _first_layer_expert_backward(spec, setup, st, act, k, G, G_layer)
            if expert:  # fused MoE experts: the first layer's gate_up weight gradient in flight
                candidates.append(phase(big + n_states + n_grads + 2, **with_extra(
                    ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=expert[0],
                    activations=expert[1], logits=held_logits, kv_cache=held_kv,
                    temporaries=last_temps + expert[2])))
            sinks = _first_layer_sink_attention_backward(spec, setup, st, act, k, G)
            if sinks:  # eager attention with sinks: the first layer's score gradients
                candidates.append(phase(big + n_states + n_grads + 3, **with_extra(
                    ranked.backward_loss_extra(), weights=W, optimizer_state=O_fwd, gradients=sinks[0],
                    activations=sinks[1], logits=held_logits, kv_cache=held_kv,
                    temporaries=last_temps + sinks[2])))
        if ranked.gathers:  # FSDP2 / ZeRO-3: the peak can sit inside a layer's backward
            layer = ranked.backward_layer(saved, int(act.layer_bytes * k), layer_working_set(spec, setup), recomputed)
            if R:  # without gradient sync no shard is made: the accumulated unsharded gradients instead
                # (FSDP1: this micro-batch's head gradient still waits apart for the root's views)
                layer = dict(layer, gradients=ranked.head_grads if ranked.flat else 0)
            candidates.append(phase(big + n_states + n_act, **with_extra(
                layer, weights=W, optimizer_state=O_fwd, gradients=R, logits=held_logits, kv_cache=held_kv,
                temporaries=bwd_temps)))
        # each phase's moment by its live tensors, as the phase by theirs (estimate()): the analytic
        # allocator term a candidate carries until the replay replaces it counts its large tensors,
        # and at the end of backward the gradients' many made the end win over the loss's moment
        # (CUDA sim, GPT-2 12 layers full bf16, TRL's chunked loss with checkpointing, b2 x s1024:
        # 16.6 MiB more tensors at the loss: backward -1.42 -> -0.01 %, first step -2.37 -> -0.00 %)
        phases[Phase.BACKWARD] = max(candidates, key=_tensor_bytes)
        if setup.optimizer is Optimizer.NONE:  # forward and backward only; zero_grad frees the gradients
            return phases
        phases[Phase.OPTIMIZER] = phase(big + n_grads + 2 * n_states, **with_extra(
            ranked.optimizer_extra(), weights=W, gradients=G + st.master_grads, optimizer_state=O,
            logits=held_logits if held else 0, kv_cache=held_kv_end if held else 0,
            temporaries=st.workspace + st.opt_temps + constant))
        return phases

    steady = build(False)
    same_first = st.master_weights == O and _resident_gradients(setup, st, True) == _resident_gradients(
        setup, st, False) and setup.loop is not Loop.HELD and not (ranked.flat and G)
    return steady, None if same_first else (lambda: build(True))


def _dpo_phases(spec: ModelSpec, setup: Setup, st: _Static, k: float, constant: int,
                phase: _Phases, loaded: Setup) -> tuple[_PhaseMap, Callable[[], _PhaseMap] | None]:
    """A DPOTrainer step (estimator/dpo.py): the policy's forward, backward and optimizer step
    at twice the batch, the separate reference's weights in every phase (in the dtypes it is
    ``loaded`` in: peft's k-bit preparation casts the policy's, not the reference's), and the
    reference forward (``Phase.REFERENCE``) after the policy's, beside everything the policy saved."""
    policy = dpo.policy_setup(setup)
    steady, first = _training_phases(spec, policy, st, k, constant, phase)
    key = loaded.shape_free
    ref_w = dpo.reference_weight_bytes(spec, setup, _weight_bytes(spec, key, count_params(spec).total)
                                       + _buffer_bytes(spec, key))
    ref = None
    if dpo.has_reference_forward(setup):
        act = acts.checkpointed_activations(spec, policy) if policy.grad_ckpt else acts.training_activations(spec,
                                                                                                            policy)
        saved = int(act.total * k) + int(k * input_leaf_bytes(spec, policy)) - act.outside.get("recomputed_layer", 0)
        ref = dpo.reference_forward_bytes(spec, policy, int(act.outside.get("head_input", 0) * k),
                                          int(k * prefill_transient(spec, policy)))
        ref = {Category.ACTIVATIONS: saved + int(ref["activations"] * k), Category.LOGITS: int(ref["logits"] * k)}

    def with_reference(phases: _PhaseMap) -> _PhaseMap:
        out: _PhaseMap = {}
        for ph, comp in phases.items():
            out[ph] = dict(comp, **{Category.WEIGHTS: comp[Category.WEIGHTS] + ref_w})
            if ph is Phase.FORWARD and ref is not None:
                out[Phase.REFERENCE] = dict(out[ph], **ref)
        return out

    return with_reference(steady), None if first is None else (lambda: with_reference(first()))


def _grpo_phases(spec: ModelSpec, setup: Setup, st: _Static, k: float, constant: int,
                 phase: _Phases) -> tuple[_PhaseMap, Callable[[], _PhaseMap] | None]:
    """A GRPOTrainer step (estimator/grpo.py): ``model.generate`` of the generation batch
    (``Phase.GENERATE``: the inference setup's prefill and last decode step, the larger, beside
    the optimizer's state as the previous step left it; none before the first step), the no-grad
    log-prob pass where TRL runs one (``Phase.LOGPROB``), then the training step on prompt +
    completion."""
    train = grpo.training_setup(setup)
    steady, first = _training_phases(spec, train, st, k, constant, phase)
    inference = _inference_phases(spec, grpo.generation_setup(setup), st, k, constant, phase)
    generate = max(inference.values(), key=_tensor_bytes)
    # model.zero_grad() at the previous step's end set the gradients to None (transformers 5.24
    # trainer.py, set_to_none); with --keep-grads they stay allocated, zeroed
    # (--optimizer none has no optimizer phase: every gradient is there after backward)
    after = steady.get(Phase.OPTIMIZER)
    held = (after[Category.GRADIENTS] if after else st.gradients) if setup.keep_grads else 0
    logprob = None
    if grpo.has_logprob_pass(setup) or grpo.has_reference_pass(setup):
        # the no-grad pass's peak beside the model states as generation saw them (estimator/grpo.py)
        extra = grpo.logprob_pass_bytes(spec, train, int(k * prefill_transient(spec, train)))
        logprob = {Category.ACTIVATIONS: int(k * extra["activations"]), Category.LOGITS: int(k * extra["logits"]),
                   Category.KV_CACHE: 0}

    def with_generation(phases: _PhaseMap, states: int) -> _PhaseMap:
        out = {Phase.GENERATE: dict(generate, **{Category.OPTIMIZER_STATE: states, Category.GRADIENTS: held})}
        if logprob is not None:
            out[Phase.LOGPROB] = dict(out[Phase.GENERATE], **logprob)
        out.update(phases)
        return out

    states = after[Category.OPTIMIZER_STATE] if after else 0
    key = setup.shape_free
    ref_w = grpo.reference_weight_bytes(setup, _weight_bytes(spec, key, count_params(spec).total)
                                        + _buffer_bytes(spec, key))

    def with_reference(phases: _PhaseMap) -> _PhaseMap:
        return {ph: dict(comp, **{Category.WEIGHTS: comp[Category.WEIGHTS] + ref_w}) for ph, comp in phases.items()}

    return (with_reference(with_generation(steady, states)),
            lambda: with_reference(with_generation(first() if first else steady, 0)))


def _first_layer_expert_backward(spec: ModelSpec, setup: Setup, st: _Static, act, k: float, G: int,
                                 G_layer: int) -> tuple[int, int, int] | None:
    """(gradients, activations, temporaries) inside the first decoder layer's expert backward, the
    last layer backward reaches, where fused MoE experts make their largest gradient: every other
    layer's gradients exist, and of this layer's the down projection's and the biases' (its
    MLP runs backward first); the gate_up stack's weight gradient is being made (grouped_mm's
    backward: transformers integrations/moe.py:490-492, the native op's derivative gives the
    input's and the weight's gradients at once) beside the gradient of its output (S, 2f), the
    input's gradient (S, h) and the residual stream's gradient (T, h); the layer's saved
    activations but the MLP's, freed by then, are still there (measured on the sim: gpt-oss 4
    layers of 32 experts, 16 heads, vocab 8000, b2 x s1024 bf16, -1.29 % without this moment).
    ``None`` for a model without trainable fused experts."""
    fused = [lin for lin in layer_linears(spec) if lin.fused_experts]
    if not fused or not st.states.trainable:
        return None
    per_elem = st.states.gradients // st.states.trainable
    gate_up = fused[0]
    in_flight = gate_up.copies * gate_up.in_features * gate_up.out_features * per_elem
    done_here = sum(lin.params for lin in fused) * per_elem - in_flight
    gradients = max(G - G_layer - st.untied_embed_grad - st.embed_bwd // 2 + done_here, 0)
    left = act.layer_bytes - act.per_layer.get("mlp", 0) - act.per_layer.get("moe_weighted", 0)
    T, p = setup.batch * setup.seq, setup.precision.compute_bytes
    S = T * spec.experts_per_token
    working = p * (S * gate_up.out_features + S * spec.hidden_size + T * spec.hidden_size)
    return gradients, int(k * left), in_flight + int(k * working)


def _recomputed_experts_backward(spec: ModelSpec, setup: Setup, st: _Static, act, k: float, G: int, G_layer: int,
                                 R: int, first: bool) -> tuple[int, int, int] | None:
    """(gradients, activations beyond the saved ones less the head's, temporaries) inside an MoE
    layer's backward of its routed experts' routing-weight product, with checkpointing, where the
    layer's recomputation stopped after its experts returned (Arch.recomputed_experts_backward: a
    shared expert runs after them), beside the layer's recomputed tensors less what its backward
    freed so far. ``first``: in the first MoE layer, the last such backward reaches, where every
    gradient exists but the embedding's, the dense layers' before it and this layer's not yet made,
    and the later layers' inputs are freed (full training's peak); else in the last layer, the first
    reached, every layer's input still saved and only the head's and this layer's shared expert's
    gradients made (LoRA's). ``None`` elsewhere."""
    moment = arch_of(spec).recomputed_experts_backward(spec, setup)
    if moment is None or not spec.num_experts:
        return None
    elements, freed, working = moment
    T = setup.batch * setup.seq
    dense = arch_of(spec).dense_layers(spec)
    per_elem = st.states.gradients // max(st.states.trainable, 1)
    recomputed = act.outside.get("recomputed_layer", 0) - int(k * freed * T)
    if not first:
        head = spec.vocab_size * (spec.embed_dim or spec.hidden_size) * per_elem if setup.mode is Mode.FULL else 0
        return R + head + elements * per_elem, recomputed, working * T
    if setup.mode is Mode.FULL and spec.has_formula:
        inv = inventory_of(spec)
        pending = per_elem * (dense * sum(t.elems for t in inv.dense_layer) + inv.layer_elems - elements)
    else:
        pending = (dense + 1) * G_layer
    gradients = max(R, G - st.untied_embed_grad - st.embed_bwd // 2 - pending)
    layer_input = int(act.per_layer.get("layer_input", 0) * k)
    return gradients, recomputed - (spec.num_layers - dense - 1) * layer_input, working * T


def _last_layer_sink_scores(spec: ModelSpec, setup: Setup, act, k: float, saved: int) -> int:
    """Activations inside the last decoder layer's eager attention where the scores carry a
    sink column (traits ``attn_sinks``; gpt-oss modeling_gpt_oss.py:239-250), without
    checkpointing: every earlier layer's saved tensors and this layer's up to its scores, beside
    the masked scores (s columns), the concatenated logits and their max-subtracted copy (or
    that copy and the probabilities: s + 1 columns each) and the two additive masks (full and
    sliding, (b, 1, s, s) each, alive through the model's forward: :467-470), the unrepeated
    rotated key and the value (locals of the attention), the embedding output (the model's
    ``inputs_embeds``, :451-452) and the layer's input (its ``residual``, :351), none of which
    autograd saves. 0 where no sink,
    not eager, or checkpointed (measured on a real CPU step: gpt-oss 2 layers b2 x s1024, -3.1 %
    at the forward without it)."""
    if setup.grad_ckpt or setup.attn.value != "eager" or not traits(spec, setup).attn_sinks:
        return 0
    T, p, a, s = setup.batch * setup.seq, setup.precision.compute_bytes, spec.num_heads, setup.seq
    per = act.per_layer
    after = sum(per.get(name, 0) for name in ("attn_scores", "mlp", "moe_routing", "moe_weighted", "o_proj_input")) \
        + per.get("norms", 0) // spec.norms_per_layer + per.get("linear_inputs", 0) // 2
    head = act.outside.get("final_norm", 0) + act.outside.get("head_input", 0)
    # (in fp32 the layer input is the very tensor its norm saves, ``x.to(float32)`` copying nothing)
    unsaved_inputs = 2 * spec.hidden_size if p != FP32 else 0
    transient = p * a * (3 * s + 2) * T + 2 * p * s * T + p * (2 * spec.kv_dim + unsaved_inputs) * T
    return saved - int(k * (after + head)) + int(k * transient)


def _first_layer_sink_attention_backward(spec: ModelSpec, setup: Setup, st: _Static, act, k: float,
                                         G: int) -> tuple[int, int, int] | None:
    """(gradients, activations, temporaries) inside the first decoder layer's eager attention
    backward where the scores carry a sink column (traits ``attn_sinks``; gpt-oss
    modeling_gpt_oss.py:239-253): the value matmul's gradient of the probabilities' view, the
    probabilities' (heads, s, s + 1) gradient the slice's backward makes and the softmax's
    backward output, beside the residual stream's and the attention output's gradients (T, h)
    and (T, heads x d); every gradient but the embedding's and the layer's q/k/v projections'
    exists; of the layer's saved tensors the input norm's, the normed input, q and the repeated
    k and the max's indices remain (measured on the sim: gpt-oss 4 layers, 64 heads, vocab 8000,
    b2 x s1024 bf16, -1.07 % without this moment). ``None`` where no sink or not eager."""
    if setup.attn.value != "eager" or not traits(spec, setup).attn_sinks or not st.states.trainable:
        return None
    per_elem = st.states.gradients // st.states.trainable
    qkv = sum(lin.params for lin in layer_linears(spec) if lin.name in ("q_proj", "k_proj", "v_proj"))
    gradients = max(G - st.untied_embed_grad - st.embed_bwd // 2 - qkv * per_elem, 0)
    return gradients, int(k * acts.sink_attention_left(spec, act)), int(k * acts.sink_attention_working(spec, setup))


def _last_layer_sink_attention_backward(spec: ModelSpec, setup: Setup, act, k: float,
                                        saved: int) -> tuple[int, int] | None:
    """(activations, temporaries) inside the last decoder layer's eager sink attention
    backward, the first attention backward reaches (LoRA: no gradient worth counting is made
    before it; full training: the head's and this layer's but q/k/v's): every earlier layer's
    saved tensors, this layer's that the softmax backward
    still finds, and the buffers of that backward (measured on a real CPU step: gpt-oss QLoRA
    with peft's fp32 preparation, 2 layers b2 x s1024, -15 % without this moment; full fp32 -10.7 %)."""
    if setup.attn.value != "eager" or not traits(spec, setup).attn_sinks:
        return None
    head = act.outside.get("final_norm", 0) + act.outside.get("head_input", 0)
    gone = act.layer_bytes - acts.sink_attention_left(spec, act) + head
    return saved - int(k * gone), int(k * acts.sink_attention_working(spec, setup))


def _last_layer_gradients(spec: ModelSpec, st: _Static) -> int:
    """Full training, inside the last layer's attention backward: the gradients made by then,
    the LM head's (untied), the final norm's and the layer's own but its q/k/v projections'."""
    if not st.states.trainable:
        return 0
    per_elem = st.states.gradients // st.states.trainable
    inv = inventory_of(spec)
    qkv = sum(lin.params for lin in layer_linears(spec) if lin.name in ("q_proj", "k_proj", "v_proj"))
    return per_elem * (sum(t.elems for t in inv.final) + inv.layer_elems - qkv)


def _layer_gradients(spec: ModelSpec, setup: Setup, st: _Static) -> int:
    """Bytes of one decoder layer's gradients on this rank (unsharded schemes)."""
    if not st.states.trainable:
        return 0
    per_elem = st.states.gradients // st.states.trainable
    if setup.mode is Mode.FULL:
        return inventory_of(spec).layer_elems * per_elem if spec.has_formula else 0
    return st.states.trainable // max(spec.num_layers, 1) * per_elem


def _eval_phases(spec: ModelSpec, setup: Setup, st: _Static, k: float, constant: int,
                 phase: _Phases) -> dict[Phase, dict[Category, int]]:
    """One forward under no_grad with full logits and the loss (``model(ids, labels=ids)``
    in an evaluation or perplexity loop; ``model(ids)``, logits only, with --loss none, as
    reward scoring and DPO's reference pass run it): its peak is inside a layer (the
    prefill's working set, with the KV cache when the model builds one) or at the loss,
    where the logits, their fp32 copy (transformers ForCausalLMLoss: ``logits.float()``,
    none when they are fp32) and cross_entropy's fp32 log-softmax coexist."""
    W, big = st.weights, st.big
    T, V, p = setup.batch * setup.seq, spec.vocab_size, setup.precision.compute_bytes
    cache = kv_cache_bytes(spec, setup, setup.seq) if setup.use_cache else 0
    # soft-capping (``logits / cap``, ``tanh``, ``* cap``: 5.24 models/gemma2/modeling_gemma2.py:520-523,
    # models/gemma4/modeling_gemma4.py:1920-1923) rebinds ``logits`` under no_grad: each step frees the
    # last, so no copy of it is alive at the loss (measured on the sim: Gemma 4 eval, 1 GiB less at s1024)
    loss = (p + (0 if p == FP32 else FP32) + FP32) * T * V
    if setup.loss in (Loss.LOGITS_SUM, Loss.NONE):
        # logits.sum(), or no labels (a scoring forward, --loss none): the model's forward makes
        # no loss, only the logits in the compute dtype (and soft-capping's tanh); transformers 5's
        # LlamaForCausalLM.forward upcasts nothing without labels (``self.loss_function`` runs only
        # ``if labels is not None``, models/llama/modeling_llama.py:474, 5.24)
        loss = (p + (p if spec.logit_softcap else 0)) * T * V
    elif setup.semantics.loss_copies_shifted_logits:  # transformers < 4.49: see logits.logits_bytes
        loss += FP32 * (2 * setup.batch * (setup.seq - 1) - T) * V
    layer = phase(big + 2 * spec.num_layers + 4, weights=W, kv_cache=cache,
                  activations=int(k * prefill_transient(spec, setup)), temporaries=st.workspace + constant)
    at_loss = phase(big + 2 * spec.num_layers + 4, weights=W, kv_cache=cache, logits=int(k * loss),
                    activations=int(k * setup.precision.compute_bytes * spec.hidden_size * T),
                    temporaries=st.workspace + constant)
    return {Phase.FORWARD: max((layer, at_loss), key=_tensor_bytes)}


def _inference_phases(spec: ModelSpec, setup: Setup, st: _Static, k: float, constant: int,
                      phase: _Phases) -> dict[Phase, dict[Category, int]]:
    """The prefill of the prompt and, with new tokens, the last decode step."""
    W, big = st.weights, st.big
    logits = setup.batch * spec.vocab_size * setup.precision.compute_bytes  # logits_to_keep=1
    kv = kv_cache_bytes(spec, setup, setup.seq + setup.new_tokens)
    prompt_kv = kv_cache_bytes(spec, setup, setup.seq)
    if traits(spec, setup).tuple_cache and kernels.qkv_views(spec, setup):
        # an old tuple cache holds GPT-2's key and value as views of c_attn's output, which
        # they keep whole after the prefill (3 h per token, caches.tuple_cache_bytes)
        prompt_kv = prompt_kv * 3 * spec.q_dim // (2 * spec.kv_dim)
    prefill = [phase(big + 2 * spec.num_layers + 4, weights=W, kv_cache=prompt_kv,
                     activations=int(k * prefill_transient(spec, setup)), logits=logits,
                     temporaries=st.workspace + constant)]
    tr = traits(spec, setup)
    full, fp32_copy = tr.prefill_full_logits, tr.prefill_logits_fp32
    if full:
        # older releases compute every position's logits (the Llama family then copies them
        # to fp32, traits prefill_full_logits): at that moment the final hidden states
        # (the model's output) are alive and the layers' transients are gone
        T, p = setup.batch * setup.seq, setup.precision.compute_bytes
        prefill.append(phase(big + 2 * spec.num_layers + 4, weights=W, kv_cache=prompt_kv,
                             activations=int(k * p * spec.hidden_size * T),
                             logits=T * spec.vocab_size * (p + (FP32 if fp32_copy and p != FP32 else 0)),
                             temporaries=st.workspace + constant))
    phases = {Phase.PREFILL: max(prefill, key=_tensor_bytes)}
    if setup.new_tokens:
        # DynamicCache.update concatenates per layer, the keys and then the values (5.24
        # cache_utils.py:136-137 DynamicLayer.update): the old and the new keys, or values, of
        # one layer coexist -- half a layer's cache beside the rest
        growth = kv // max(2 * spec.num_layers, 1)
        L = setup.seq + setup.new_tokens
        kv = _decode_cache(spec, setup, tr, kv, L)
        decode = [phase(big + 2 * spec.num_layers + 2, weights=W, kv_cache=kv + growth,
                        logits=logits, temporaries=st.workspace + constant)]
        working = arch_of(spec).decode_working(spec, setup, L)
        if working:  # a family's own attention working set over the whole cache (Arch.decode_working)
            decode.append(phase(big + 2 * spec.num_layers + 2, weights=W, kv_cache=kv, logits=logits,
                                activations=int(k * working), temporaries=st.workspace + constant))
        if kernels.cuda_sdpa_backend(spec, setup) == "math" and setup.attn.value != "eager":
            # the math kernel (fp32 grouped heads on CUDA) over the whole cache after the update:
            # the keys and values repeated to every head (repeat_interleave for enable_gqa), the
            # repeated keys' transpose scaled by sqrt(scale) (aten/src/ATen/native/transformers/
            # attention.cpp _scaled_dot_product_attention_math: query and key each times
            # sqrt(scale)), and two (b, heads, 1, L) fp32 score matrices
            work = FP32 * (3 * spec.q_dim + 2 * spec.num_heads) * setup.batch * L
            decode.append(phase(big + 2 * spec.num_layers + 2, weights=W, kv_cache=kv, logits=logits,
                                activations=int(k * work), temporaries=st.workspace + constant))
        if setup.attn.value == "eager":
            # the last layer's attention over the whole cache, after its update: repeat_kv's
            # copies of its keys and values to every head where heads are grouped (5.24
            # models/llama/modeling_llama.py repeat_kv: expand + reshape copies, n_rep 1 returns
            # its input), the (b, heads, 1, L) scores with the softmax's transient (as in the
            # prefill, prefill_transient) and the (b, 1, 1, L) additive mask
            # sliding layers attend over their window (cache_utils.py:242-249: the window's cache
            # and the new token) -- all of L where any layer attends fully
            if tr.sliding_layers >= spec.num_layers and tr.sliding_window:
                L = min(L, tr.sliding_window)
            p = setup.precision.compute_bytes
            copies = 2 * p * spec.q_dim * setup.batch * L if spec.num_kv_heads < spec.num_heads else 0
            softmax = p + kernels.eager_softmax_transient(spec, setup)
            scores = (softmax * spec.num_heads + p) * setup.batch * L
            decode.append(phase(big + 2 * spec.num_layers + 2, weights=W, kv_cache=kv, logits=logits,
                                activations=int(k * (copies + scores)), temporaries=st.workspace + constant))
        phases[Phase.DECODE] = max(decode, key=_tensor_bytes)
    return phases


def _decode_cache(spec: ModelSpec, setup: Setup, tr, kv: int, L: int) -> int:
    """The cache at a decode step's peak where the cache keeps a sliding layer's window only
    (traits ``cache_keeps_window``; cache_utils.py:242-249): the first decode step replaces the
    prompt-long storage each sliding layer's view kept with the window, layer by layer, so its
    peak, in its first layer, has that layer at the window when it slides and every other layer at
    the whole length; a later step has every sliding layer at the window (measured on the sim:
    gpt-oss 8 layers b2 x s1024, window 128). ``kv``: every layer at the whole length ``L``."""
    window, sliding = tr.sliding_window, tr.sliding_layers
    if not (tr.cache_keeps_window and sliding and window and L > window):
        return kv
    per_layer_token = kv // (spec.num_layers * L)
    first_slides = arch_of(spec).layer_types(spec)[0] == "sliding_attention"
    first = kv - (per_layer_token * (L - window) if first_slides else 0)
    last = kv - sliding * per_layer_token * (L - window)
    return max(first, last) if setup.new_tokens > 1 else first


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
    cast_fwd: int  # autocast's half weight copies alive at the loss
    cast_bwd: int  # ... and at the start of backward
    cast_layer: int  # ... that a checkpointed layer's recomputation adds
    embed_bwd: int
    tied_pending: int  # the tied embedding's summed gradient before it becomes .grad
    untied_embed_grad: int  # an untied embedding's dense gradient
    master_weights: int  # mixed-bf16: the fp32 masters among the optimizer state (made with the optimizer)
    master_grads: int
    opt_temps: int


@lru_cache(maxsize=4096)
def _static(spec: ModelSpec, key: Setup, workspace: int, context: int, per_tensor: int) -> _Static:
    """Every term of the estimate that batch and sequence length do not change; ``key`` is
    a :attr:`Setup.shape_free` setup, the others are the overheads in force."""
    states = _model_states(spec, key)
    ranked = per_rank_states(spec, key, states)
    full = key.mode is Mode.FULL
    # live tensors over 1 MiB, for the allocator's rounding slack (overheads.py)
    big = _large_tensors(spec, key.precision.param_bytes)
    cast_fwd, cast_bwd, cast_layer = _autocast_weight_copies(spec, key, states.linear_weights)
    # At the end of backward a tied embedding matrix has two gradients, the lm_head's (made
    # early in backward) and the embedding's dense (V, h) one, and autograd's InputBuffer
    # sums them before AccumulateGrad steals the sum into .grad (torch/csrc/autograd/
    # input_buffer.cpp): at that moment three (V, h) tensors exist and .grad does not yet,
    # so the sum counts as temporaries, not gradients (read off the tracker's categories;
    # an untied embedding's gradient is stolen into .grad without a copy). Under ZeRO-2/3
    # and FSDP the gradients are sharded and the root group's are modelled in sharding.py.
    grad_bytes = states.gradients // max(states.trainable, 1) if full else 0
    tied = spec.vocab_size * (spec.embed_dim or spec.hidden_size) * grad_bytes if spec.tie_word_embeddings else 0
    embed_bwd = 2 * tied
    tied_pending = tied if key.sharding in (Sharding.NONE, Sharding.DDP) else 0
    untied = 0 if spec.tie_word_embeddings else spec.vocab_size * (spec.embed_dim or spec.hidden_size) * grad_bytes
    masters = FP32 * states.trainable if key.precision is Precision.MIXED_BF16 and full else 0
    masters = masters * ranked.optimizer_state // max(states.optimizer_state, 1)  # this rank's share
    # mixed-bf16: the fp32 copy of every gradient the master step reads
    master_grads = FP32 * states.trainable if key.precision is Precision.MIXED_BF16 and full else 0
    opt_temps = optimizer_temporaries(key, states.optimizer_state, states.trainable,
                                      states.largest_trainable_tensor) if key.training else 0
    if key.sharding in _SHARDED_STATES:
        # each rank steps only its shard of the master weights and states (ZeRO Sec. 5)
        master_grads = -(-master_grads // key.world_size)
        opt_temps = -(-opt_temps // key.world_size)
        if ranked.flat and key.training and key.resolved_optimizer_impl not in (OptimizerImpl.FOREACH,
                                                                                 OptimizerImpl.FUSED):
            # FSDP1's optimizer steps views of the flat shards: the for-loop's temporaries
            # follow the largest piece of one parameter on this rank
            opt_temps = optimizer_temporaries(key, states.optimizer_state, states.trainable, ranked.largest_view)
    return _Static(states, ranked.weights, ranked.gradients, ranked.optimizer_state,
                   ranked, workspace, context, per_tensor, big,
                   big * STATE_TENSORS[key.optimizer] if full else 0, big if full else 0,
                   cast_fwd, cast_bwd, cast_layer, embed_bwd, tied_pending, untied, masters, master_grads, opt_temps)


def _autocast_weight_copies(spec: ModelSpec, key: Setup, linear_weights: int) -> tuple[int, int, int]:
    """Bytes of the half copies of matmul weights autocast makes: alive at the loss, at the
    start of backward, and added while a checkpointed layer is recomputed. autocast caches
    the cast of a trainable leaf weight for its region and casts a frozen weight anew at
    every use (aten/src/ATen/autocast_mode.cpp, cached_cast:
    ``can_try_cache`` needs ``requires_grad``); the cache is cleared when the outermost
    region exits, after the loss, but autograd keeps each copy it saved until that matmul's
    backward. Checkpointed layers drop what they saved and recompute one layer at a time.
    - full training: every weight's copy is cached; in backward, with checkpointing, only
      the LM head's and one recomputed layer's;
    - LoRA: a frozen weight's copy is saved where its linear's input needs a gradient:
      every linear after the first adapter, and the LM head (the adapters' own fp32
      weights are cached); with checkpointing, the LM head's (and one layer's in backward),
      and the adapters' cached copies only until the forward's region exits: the checkpointed
      layers saved none of them (measured on a real CPU step, SmolLM2-135M amp-bf16 LoRA
      all-linear with checkpointing at b1 x s2048: backward +0.43 % with them, their 9.3 MiB)."""
    if not (key.precision.is_autocast and key.training):
        return 0, 0, 0
    head = spec.vocab_size * (spec.embed_dim or spec.hidden_size)
    layer = HALF * (linear_weights - head) // max(spec.num_layers, 1)
    if key.mode is Mode.FULL:
        if key.grad_ckpt:
            return HALF * linear_weights, HALF * head, layer
        return HALF * linear_weights, HALF * linear_weights, 0
    adapters = HALF * lora_params(spec, key.lora_targets, key.lora_rank)
    if key.grad_ckpt:
        return HALF * head + adapters, HALF * head, layer
    saved = HALF * (linear_weights - _frozen_before_first_adapter(spec, key)) + adapters
    return saved, saved, 0


def _frozen_before_first_adapter(spec: ModelSpec, key: Setup) -> int:
    """Weight elements of the first layer's linears whose input needs no gradient: those
    run before any adapter's output joins the stream (the block input projections of the
    first block holding an adapter, and every linear of the blocks before it)."""
    targets = {id(lin) for lin in lora_targets(spec, key.lora_targets)}
    linears = layer_linears(spec)
    elems = 0
    for group in dict.fromkeys(lin.group for lin in linears):
        members = [lin for lin in linears if lin.group == group]
        if not any(id(lin) in targets for lin in members):
            elems += sum(lin.copies * lin.in_features * lin.out_features for lin in members)
            continue
        inputs, output = members[:-1], members[-1]
        elems += sum(lin.copies * lin.in_features * lin.out_features for lin in inputs)
        if not any(id(lin) in targets for lin in inputs):  # only the output projection adapted
            elems += output.copies * output.in_features * output.out_features
        return elems
    return elems


@lru_cache(maxsize=1024)
def _group(family: str, attn, precision) -> str:
    return calibration_key(family, attn.value, precision.value)


@lru_cache(maxsize=1024)
def _large_tensors(spec: ModelSpec, param_bytes: int) -> int:
    limit = MiB // param_bytes
    return sum(1 for x in param_tensor_sizes(spec) if x > limit)


def kv_cache_bytes(spec: ModelSpec, setup: Setup, tokens: int) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * batch * tokens * bytes: transformers'
    DynamicCache keeps a (batch, kv_heads, tokens, head_dim) key and value per layer
    (src/transformers/cache_utils.py, DynamicLayer.update); a family caching something else
    says its elements per token and layer (Arch.kv_elems_per_token: DeepSeek-V3's latent)."""
    return arch_of(spec).kv_elems(spec) * setup.batch * tokens \
        * setup.precision.compute_bytes


def prefill_transient(spec: ModelSpec, setup: Setup) -> int:
    """Working set of one layer during the no-grad prefill: the residual stream (with the
    embedding output, which the model's forward keeps referenced, and the normed input)
    and the larger of the MLP and the attention core. The MLP holds act(gate), up and their
    product (SwiGLU); the fused gate_up output and those two (Phi-3: gate and up are views
    of it); x, 0.5*x and two links of the GELU-tanh chain (GPT-2's NewGELUActivation); the
    activation and its input (ReLU). Attention holds q, k, v and the output, the scores
    and their fp32 softmax (eager), or the fp32 scaled q, repeated k and v and two
    (heads, s, s) fp32 matrices (the math kernel a CUDA step runs for fp32 grouped heads,
    kernels.cuda_sdpa_backend)."""
    T = setup.batch * setup.seq
    p = setup.precision.compute_bytes
    h, f = spec.hidden_size, spec.intermediate_size
    resid = 3 * p * h * T
    tr = traits(spec, setup)
    mlp = {MLP.GATED_FUSED: 4, MLP.GATED: 3, MLP.NEW_GELU: 4}.get(tr.mlp, 2) * p * f * T
    if spec.num_experts:
        # grouped_mm experts (integrations/moe.py grouped_mm_experts_forward) over S = T x top-k
        # rows: while the gate runs, the gathered inputs (S, h), the fused gate_up output (S, 2f),
        # act(gate) and the product (S, f each) are alive (locals until the function returns);
        # later the gathered inputs, the down projection's output, its routing-weighted copy and
        # that copy put back in token order ``weighted_out[inv_perm]`` (S, h each)
        mlp = p * spec.experts_per_token * T * max(h + 4 * f, 4 * h)
    a, s = spec.num_heads, setup.seq
    # eager: while the softmax runs, its input (the masked scores), the input converted to the
    # softmax's dtype where that is fp32 and the input is not (``softmax(x, dtype=float32)``
    # converts first: aten/src/ATen/native/SoftMax.cpp ``host_softmax`` on ``input.to(dtype)``)
    # and its output, beside q and the output (measured on the sim: 10 bytes a score in fp16)
    softmax = p + kernels.eager_softmax_transient(spec, setup)
    if setup.attn.value == "eager":
        # and the (b, 1, s, s) mask transformers builds for eager attention in the compute dtype
        # (masking_utils.py: eager masks are additive, min_dtype where masked)
        attn = softmax * a * s * T + 2 * p * spec.q_dim * T + p * s * T
    elif kernels.cuda_sdpa_backend(spec, setup) == "math":
        attn = FP32 * (3 * spec.q_dim + 2 * a * s) * T + kernels.math_kernel_extra(spec, setup)
    else:
        attn = p * (2 * spec.q_dim + 2 * spec.kv_dim) * T
    masked = kernels.masked_layers(spec, setup)
    if masked:  # a sliding-window layer's converted mask (and repeat_kv's copies)
        attn += kernels.masked_layer_bytes(spec, setup) * T
    resid, mlp, attn = arch_of(spec).prefill_quirk(spec, setup, tr, resid, mlp, attn, softmax,
                                                   kernels.cuda_sdpa_backend(spec, setup) == "math")
    return resid + max(mlp, attn)
