"""Optimizer state, and what ``optimizer.step()`` allocates beyond it, by optimizer and
implementation. Pure arithmetic on ints.

- torch.optim keeps state in the parameter's dtype (``torch/optim/adamw.py``:
  ``exp_avg``/``exp_avg_sq`` are ``zeros_like(p)``); mixed-bf16 keeps fp32 states beside
  fp32 master weights (ZeRO, Rajbhandari et al. 2019 Sec. 3: K = 12 bytes/param).
- bitsandbytes 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"): 1 byte per value plus one fp32 absmax per 256-value block
  (bitsandbytes ``functional.py``, blocksize=256); tensors under ``min_8bit_size`` = 4096
  elements keep 32-bit state (bitsandbytes ``optim/optimizer.py``).
- Adafactor (Shazeer & Stern 2018): a factored second moment, one row and one column
  statistic per matrix, a full one per vector.
"""
from __future__ import annotations

from collections.abc import Sequence

from .modelspec import ModelSpec
from .params import layer_linears, lora_targets
from .setup import Device, Mode, Optimizer, OptimizerImpl, Precision, Setup
from .units import FP32

#: state tensors each optimizer keeps per parameter tensor
STATE_TENSORS = {Optimizer.ADAMW: 2, Optimizer.ADAMW_8BIT: 2, Optimizer.PAGED_ADAMW_8BIT: 2,
                 Optimizer.SGD: 0, Optimizer.NONE: 0,
                 Optimizer.SGD_MOMENTUM: 1, Optimizer.ADAFACTOR: 1}
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
#: the dynamic and unsigned dynamic 256-value fp32 maps an 8-bit optimizer shares across its
#: tensors (bitsandbytes 0.50.2 optim/optimizer.py:512-522 ``state["qmap1"] = self.name2qmap["dynamic"]``)
BNB_QMAP_VALUES = 256


def optimizer_state_bytes(spec: ModelSpec, setup: Setup, trainable: int, state_bytes: int,
                          sizes: Sequence[int]) -> int:
    """Bytes of optimizer state for ``trainable`` parameters in tensors of ``sizes``
    elements, each state value ``state_bytes`` wide (fp32 master weights of mixed-bf16
    included: ZeRO's K = 12 counts them)."""
    opt = setup.optimizer
    if opt is Optimizer.ADAMW:
        state = 2 * state_bytes * trainable  # exp_avg, exp_avg_sq
    elif opt.bitsandbytes:
        big = sum(x for x in sizes if x >= BNB_MIN_8BIT_SIZE)
        small = sum(x for x in sizes if x < BNB_MIN_8BIT_SIZE)
        # per tensor: two uint8 states and an fp32 absmax per 256-value block each (bitsandbytes
        # 0.50.2 optim/optimizer.py:492-529 Optimizer2State.init_state); fp32 states under 4096 values
        absmax = sum(-(-x // BNB_BLOCK) for x in sizes if x >= BNB_MIN_8BIT_SIZE)
        state = 2 * (big + FP32 * absmax) + 2 * FP32 * small + (2 * FP32 * BNB_QMAP_VALUES if big else 0)
        state -= paged_state_bytes(setup, sizes)  # in unified memory, outside the caching allocator
    elif opt in (Optimizer.SGD, Optimizer.NONE):
        state = 0
    elif opt is Optimizer.SGD_MOMENTUM:
        state = state_bytes * trainable  # momentum_buffer
    else:
        state = state_bytes * adafactor_elems(spec, setup)
    if setup.mode is Mode.FULL and setup.precision is Precision.MIXED_BF16:
        state += FP32 * trainable  # fp32 master weights
    return state


def adafactor_elems(spec: ModelSpec, setup: Setup) -> int:
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


#: PagedAdamW8bit pages the state buffers of tensors of at least this many values
#: (bitsandbytes 0.50.2 optim/optimizer.py:383 ``p.numel() < 1e5``: not paged)
BNB_PAGED_MIN_VALUES = 100_000


def paged_state_bytes(setup: Setup, sizes: Sequence[int]) -> int:
    """Bytes of a paged 8-bit optimizer's state in CUDA unified memory (cudaMallocManaged,
    functional.py:91-99 ``get_paged``): the two state buffers of every tensor of at least
    1e5 values (uint8; fp32 for a tensor under ``min_8bit_size``, never that large). The
    caching allocator never sees them (not in ``max_memory_allocated`` or reserved); resident
    on the GPU they are device memory NVML counts (the context category here), and the driver
    moves them to host memory under pressure instead of failing. On CPU paging is off and
    they are ordinary tensors (:375-382)."""
    if setup.optimizer is not Optimizer.PAGED_ADAMW_8BIT or setup.device is not Device.CUDA:
        return 0
    return sum(2 * x for x in sizes if x >= BNB_PAGED_MIN_VALUES)


def bnb_step_temporaries(setup: Setup, largest_tensor: int) -> int:
    """What a bitsandbytes 8-bit AdamW step allocates beyond its state, at its worst moment:
    nothing on CUDA (fused kernels: bitsandbytes 0.50.2 backends/cuda/ops.py
    optimizer_update_8bit_blockwise); on CPU the largest tensor's update, run as tensor ops
    (backends/cpu/ops.py:469-580 ``_optimizer_update_8bit_blockwise_cpu``): both states
    dequantized to fp32, ``g.float() * gnorm_scale``, ``p.data.float()`` (a copy unless fp32)
    and, at ``(state2_fp32.sqrt() / correction2)``, the root and the quotient: five fp32
    tensors of it (six for 16-bit parameters). A tensor under ``min_8bit_size`` steps in 32 bit
    (:345-451): the gradient's fp32 product, the root and its sum with eps, then the quotient
    (three)."""
    if setup.device is Device.CUDA:
        return 0
    copy = 1 if setup.mode is Mode.FULL and setup.precision.param_bytes != FP32 else 0
    tensors = 5 if largest_tensor >= BNB_MIN_8BIT_SIZE else 3
    return FP32 * (tensors + copy) * largest_tensor


def optimizer_temporaries(setup: Setup, optimizer_state: int, trainable: int, largest_tensor: int) -> int:
    """Bytes torch.optim allocates inside ``step()`` beyond its state.

    AdamW foreach (torch/optim/adam.py::_multi_tensor_adam): ``torch._foreach_sqrt(exp_avg_sqs)``
    makes one state-sized list; the for-loop path builds ``exp_avg_sq.sqrt() / bias_correction2_sqrt``
    per tensor (two temporaries of the largest tensor at once); fused kernels allocate none.
    """
    if setup.training and setup.optimizer.bitsandbytes:
        return bnb_step_temporaries(setup, largest_tensor)
    if not setup.training or setup.optimizer in (Optimizer.SGD, Optimizer.SGD_MOMENTUM, Optimizer.NONE):
        return 0
    per_elem = optimizer_state // max(trainable, 1) // (2 if setup.optimizer is Optimizer.ADAMW else 1)
    if setup.precision is Precision.MIXED_BF16 and setup.mode is Mode.FULL:
        per_elem = FP32
    impl = setup.resolved_optimizer_impl
    if impl is OptimizerImpl.FUSED:
        return 0
    if impl is OptimizerImpl.FOREACH:
        return per_elem * trainable
    return 2 * per_elem * largest_tensor
