"""One byte vocabulary shared by the estimator and the profiler.

Modelled on PyTorch's ``torch.distributed._tools.mem_tracker._MemRefType`` (a
str-Enum labelling every tracked byte): every predicted term has a measured twin.
"""
from __future__ import annotations

from enum import Enum


class Category(str, Enum):
    """Where a byte of device memory goes."""

    WEIGHTS = "weights"
    """Model parameters (and quantization constants, LoRA adapters, fp32 master copies)."""
    GRADIENTS = "gradients"
    """``.grad`` of every trainable parameter (DDP buckets and reduce buffers too)."""
    OPTIMIZER_STATE = "optimizer_state"
    """Optimizer state tensors (AdamW ``exp_avg``/``exp_avg_sq``, momentum, step)."""
    ACTIVATIONS = "activations"
    """Tensors autograd saves for backward, and the transient working set of inference."""
    LOGITS = "logits"
    """The LM head output, its fp32 upcast and the loss buffers (log-softmax, grads)."""
    KV_CACHE = "kv_cache"
    """Key/value cache of generation."""
    TEMPORARIES = "temporaries"
    """Short-lived buffers: optimizer foreach temporaries, autocast weight cache, cuBLAS workspace."""
    ALLOCATOR = "allocator"
    """Cached but unused bytes of the caching allocator (reserved - allocated)."""
    CONTEXT = "context"
    """CUDA context and everything NVML sees beyond the allocator's reserved bytes."""

    def __str__(self) -> str:  # "weights", not "Category.WEIGHTS"
        return self.value


#: Categories that live in tensors (``torch.cuda.max_memory_allocated`` counts them).
TENSOR_CATEGORIES = (
    Category.WEIGHTS,
    Category.GRADIENTS,
    Category.OPTIMIZER_STATE,
    Category.ACTIVATIONS,
    Category.LOGITS,
    Category.KV_CACHE,
    Category.TEMPORARIES,
)


class Phase(str, Enum):
    """Where in a step a peak falls."""

    FORWARD = "forward"
    # DPO's reference forward under no_grad, after the policy's (--trainer dpo; trl 1.16.0
    # trl/trainer/dpo_trainer.py:1327-1338): the policy's saved activations beside it
    REFERENCE = "reference"
    # GRPO's model.generate of the step's completions before its forward (--trainer grpo; trl
    # 1.16.0 trl/trainer/grpo_trainer.py:1866-1875): the prefill and every decode step, the KV
    # cache growing to prompt + max_completion, beside the model states
    GENERATE = "generate"
    # GRPO's no-grad log-prob pass over the generated batch (old_per_token_logps, --num-iterations
    # above 1; grpo_trainer.py:2642-2655), micro-batch by micro-batch, after generation
    LOGPROB = "logprob"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    ZERO_GRAD = "zero_grad"
    PREFILL = "prefill"
    DECODE = "decode"
    STEP = "step"  # a whole optimizer step, as a Trainer callback sees it (no phases inside)
    LOAD = "load"  # the model loaded onto the device, before the first step

    def __str__(self) -> str:
        return self.value
