"""The LM head's output and the loss's buffers during a training step (the logits category)."""
from __future__ import annotations

from .archs import traits
from .modelspec import ModelSpec
from .setup import Device, Loss, Setup
from .units import FP32


def logits_bytes(spec: ModelSpec, setup: Setup) -> dict[str, int]:
    """Bytes of the LM head output and the loss during a training step.

    transformers ForCausalLMLoss upcasts the logits to fp32 (``logits.float()``) and
    cross_entropy saves the fp32 log-softmax (transformers PR #33902; torchtune PR #1046).
    At the forward's end the half logits, the fp32 copy and the log-softmax coexist;
    at the start of backward the saved log-softmax, its incoming gradient and the
    gradient it returns coexist.
    """
    T = setup.batch * setup.seq
    V = spec.vocab_size
    p = setup.precision.compute_bytes
    upcast = 0 if p == FP32 else FP32
    # Gemma 2's final soft-capping (modeling_gemma2.py: logits / cap, tanh, * cap): tanh saves
    # its output, a second logits-sized tensor until its backward
    softcap = p if spec.logit_softcap else 0
    if setup.loss is Loss.LOGITS_SUM:
        # loss = logits.sum(): nothing upcast, nothing saved (SumBackward keeps the sizes). Its
        # backward returns grad.expand(sizes), a stride-0 view of one scalar, which the LM
        # head's two mm backward calls read. On CUDA each copies it to a contiguous (T, V)
        # tensor inside the kernel (a stride-0 operand is not cuBLAS-compatible:
        # aten/src/ATen/native/cuda/Blas.cpp prepare_matrix_for_cublas, ``clone(Contiguous)``),
        # one at a time; on the cpu backend no op output holds it (its tracker sees op outputs)
        copy = p * T * V if setup.device is Device.CUDA else 0
        return {"forward": (p + softcap) * T * V, "backward": softcap * T * V + copy}
    if setup.semantics.loss_copies_shifted_logits:
        # transformers < 4.49 (estimator/versions.py): cross_entropy runs on a contiguous fp32
        # copy of the logits without their last position, S = b * (s - 1) rows: at the loss the
        # half logits, the fp32 logits, the shifted copy and its log-softmax coexist; backward
        # starts with the saved log-softmax, its incoming gradient and the returned one (S rows
        # each), after which slice's backward writes them into a zeroed (T, V) gradient
        S = setup.batch * (setup.seq - 1)
        # for one sequence the slice [:, :-1, :] is contiguous already: ``contiguous()`` copies nothing
        shifted = 2 if setup.batch > 1 else 1
        if traits(spec, setup).loss_in_compute_dtype:
            # the model's own CrossEntropyLoss on the shifted logits as they are, no fp32 upcast
            # (GPT-NeoX 4.42.4 modeling_gpt_neox.py:1118-1121; BioGPT 4.46.0 modeling_biogpt.py:787-790)
            return {"forward": (p + softcap) * T * V + shifted * p * S * V,
                    "backward": softcap * T * V + p * max(3 * S, S + T) * V}
        return {"forward": (p + upcast + softcap) * T * V + shifted * FP32 * S * V,
                "backward": softcap * T * V + FP32 * max(3 * S, S + T) * V}
    return {
        # (b, s, V): the logits, their fp32 copy, the fp32 log-softmax (and soft-capping's tanh)
        "forward": (p + upcast + FP32 + softcap) * T * V,
        # (b, s, V) fp32: the saved log-softmax, its incoming gradient and the gradient it returns
        "backward": (3 * FP32 + softcap) * T * V,
    }
