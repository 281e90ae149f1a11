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
from .setup import Mode, Optimizer, OptimizerImpl, Precision, Setup
from .units import FP32

#: state tensors each optimizer keeps per parameter tensor
STATE_TENSORS = {Optimizer.ADAMW: 2, Optimizer.ADAMW_8BIT: 2, Optimizer.SGD: 0, Optimizer.NONE: 0,
                 Optimizer.SGD_MOMENTUM: 1, Optimizer.ADAFACTOR: 1}
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


def optimizer_state_bytes(spec: ModelSpec, setup: Setup, trainable: int, state_bytes: int,
                          sizes: Sequence[int]) -> int:
    """Bytes of optimizer state for ``trainable`` parameters in tensors of ``sizes``
    elements, each state value ``state_bytes`` wide (fp32 master weights of mixed-bf16
    included: ZeRO's K = 12 counts them)."""
    opt = setup.optimizer
    if opt is Optimizer.ADAMW:
        state = 2 * state_bytes * trainable  # exp_avg, exp_avg_sq
    elif opt is Optimizer.ADAMW_8BIT:
        big = sum(x for x in sizes if x >= BNB_MIN_8BIT_SIZE)
        small = sum(x for x in sizes if x < BNB_MIN_8BIT_SIZE)
        state = 2 * (big + FP32 * -(-big // BNB_BLOCK)) + 2 * FP32 * small
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


def optimizer_temporaries(setup: Setup, optimizer_state: int, trainable: int, largest_tensor: int) -> int:
    """Bytes torch.optim allocates inside ``step()`` beyond its state.

    AdamW foreach (torch/optim/adam.py::_multi_tensor_adam): ``torch._foreach_sqrt(exp_avg_sqs)``
    makes one state-sized list; the for-loop path builds ``exp_avg_sq.sqrt() / bias_correction2_sqrt``
    per tensor (two temporaries of the largest tensor at once); fused kernels allocate none.
    """
    if not setup.training or setup.optimizer in (Optimizer.ADAMW_8BIT, Optimizer.SGD,
                                                 Optimizer.SGD_MOMENTUM, Optimizer.NONE):
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
