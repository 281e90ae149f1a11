"""The LM head's output and the loss's buffers during a training step (the logits category)."""
from __future__ import annotations

from .archs import traits
from .modelspec import ModelSpec
from .setup import Device, Loss, Mode, Setup, Trainer
from .units import FP32

#: trl 1.16.0 trl/kernels/chunked_logprob.py:30 TOKEN_CHUNK_SIZE: tokens per projection tile
TRL_TOKEN_CHUNK = 4096
#: trl 1.16.0 trl/trainer/utils.py:1506 _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile
#: (the width of the tile buffer, whatever the vocabulary)
TRL_VOCAB_CHUNK = 32768
#: fp32 (N,) running statistics the forward keeps (chunked_logprob.py:340-346: running_max,
#: sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target, target_logit)
TRL_STAT_VECTORS = 7
#: Bytes per tile element alive at the worst moment of the torch fold, on devices without Triton
#: (trl 1.16.0 chunked_logprob.py). Forward, ``_forward_tile`` (:211-254) at ``e = torch.exp(z -
#: m)``: z (fp32), the bool ``before_target`` (is_top1, kept to the end of the function), z - m
#: and e (fp32): 4 + 1 + 4 + 4; its entropy term ``(e * z)`` holds the same 13 (z, e, e*z, the
#: bool). Backward, ``_backward_tile`` (:257-296) inside ``grad += grad_logprobs.unsqueeze(-1)
#: * (is_target.float() - p)``: y, z, log_p, p, grad (fp32, 20), the bool is_target (1), and two
#: fp32 temporaries at a time (is_target.float() and the difference, freed before the product
#: is made beside the difference: 8). Both counted op by op under the tracker (trl 1.16.0, torch 2.13).
TRL_FORWARD_TILE_BYTES = 13
#: GRPO's policy head asks log_probs and entropy only (trl 1.16.0 grpo_trainer.py:1068-1073): no
#: ``before_target`` bool without is_top1 (chunked_logprob.py:238-241), so z, e and ``e * z`` (fp32)
TRL_FORWARD_TILE_BYTES_ENTROPY = 12
TRL_BACKWARD_TILE_BYTES = 29


def chunked_nll_bytes(spec: ModelSpec, setup: Setup) -> dict[str, int]:
    """What TRL's fused LM head allocates (``--loss chunked-nll``; trl 1.16.0
    trl/trainer/utils.py:1548 ``add_fused_lm_head``, trl/kernels/chunked_logprob.py:299
    ``ChunkedLogProbFunction``), at its worst moment in forward and in backward. It never
    makes the (b, s, V) logits: the final hidden states of every position but the last
    (N = b (s - 1) rows) go through ``hidden @ weight[v0:v1].T`` tile by tile into one
    [min(N, 4096) x 32768] buffer in the compute dtype (``mm_buf``, :347 and :417), folded
    into online-logsumexp statistics; the backward recomputes each tile, turns it into the
    logits' gradient in place and accumulates the hidden's and the weight's gradients in fp32
    (``torch.zeros(..., dtype=torch.float32)``, :409-414; the weight's only when it trains:
    full fine-tuning, not LoRA), cast back to the parameters' dtype on return (:455-457).

    Where Triton runs the fold (CUDA, ``_use_triton``, :48) it allocates nothing beyond the
    buffer, and the forward first gathers the labelled rows (``hidden_states[mask]``,
    utils.py:1645: a copy of N x hidden); elsewhere (the cpu device) the torch fold's
    per-element temporaries are the largest term (TRL_FORWARD_TILE_BYTES, ..._BACKWARD_...),
    and ``reshape(-1, hidden)`` of the shifted hidden states copies them for more than one
    sequence (a (b, s - 1, h) slice of (b, s, h) is no view of N rows). Cited, and measured on
    the cpu device (tests/test_trl.py); the Triton path is cited, not measured."""
    # the head's weight trains in full fine-tuning (trl refuses an adapter on lm_head: sft_trainer.py:1067-1072)
    h, p, N = spec.embed_dim or spec.hidden_size, setup.precision.compute_bytes, setup.batch * (setup.seq - 1)
    grpo = setup.trainer is Trainer.GRPO
    if grpo:
        from .grpo import scored_rows  # estimator/grpo.py builds on this module
        N = scored_rows(setup)  # the completion's rows on CUDA
    elif setup.completion_only and setup.device is Device.CUDA:
        # --completion-only: the shifted labels hold the completion's tokens (the prompt's are -100),
        # and Triton's compact path scores those rows only (utils.py:1642-1645); the torch fold on
        # the cpu device scores every position whatever the labels
        N = setup.batch * setup.completion_only
    copies = setup.batch > 1 or setup.device is Device.CUDA
    out = fused_head_bytes(rows=N, vocab=spec.vocab_size, hidden=h, compute_bytes=p,
                           head_trains=setup.mode is Mode.FULL, triton=setup.device is Device.CUDA,
                           copies_rows=setup.batch > 1, autocast=setup.precision.is_autocast,
                           forward_tile_bytes=TRL_FORWARD_TILE_BYTES_ENTROPY if grpo else TRL_FORWARD_TILE_BYTES)
    if setup.mode is not Mode.FULL:
        # The head's input: a trainable head's activations count it (activations.py head_input);
        # with LoRA nothing does, yet the final hidden states (b, s, h) stay alive through the
        # head's forward (``backbone_outputs``, utils.py:1616), and in backward the rows the
        # function saved (utils.py:1645, chunked_logprob.py:386): their copy, or at one sequence
        # on the torch fold the view of them that keeps all of them. Measured on real SFTTrainer
        # and DPOTrainer LoRA steps (results/trl/): -0.2 % per phase without it.
        out = {"forward": out["forward"] + p * h * setup.batch * setup.seq,
               "backward": out["backward"] + p * h * (N if copies else setup.batch * setup.seq)}
    return out


def fused_head_bytes(rows: int, vocab: int, hidden: int, compute_bytes: int, head_trains: bool, triton: bool,
                     copies_rows: bool, autocast: bool = False,
                     forward_tile_bytes: int = TRL_FORWARD_TILE_BYTES) -> dict[str, int]:
    """:func:`chunked_nll_bytes` for N = ``rows`` labelled positions: the bytes
    ``ChunkedLogProbFunction`` holds at its worst moment in forward and in backward, beyond
    its inputs (the hidden states and the head's weight). ``forward_tile_bytes``: the torch
    fold's bytes per tile element for the outputs asked (SFT's and DPO's policy: 13; log_probs
    alone: estimator/dpo.py)."""
    p, h, V, N = compute_bytes, hidden, vocab, rows
    n, w = min(N, TRL_TOKEN_CHUNK), min(V, TRL_VOCAB_CHUNK)
    buf = n * TRL_VOCAB_CHUNK * p
    stats = TRL_STAT_VECTORS * FP32 * N
    head = V * h if head_trains else 0
    # the gradients' casts back to the parameters' dtype (``grad_hidden.to(hidden.dtype)``, :455-457),
    # made while the fp32 accumulators and the buffer still exist
    casts = p * (N * h + head) if p != FP32 and not autocast else 0
    grads = FP32 * (N * h + head)
    if triton:
        copy = p * N * h  # hidden_states[mask]: every labelled row (all of them here)
        return {"forward": buf + stats + copy, "backward": buf + grads + casts}
    copy = p * N * h if copies_rows else 0
    return {"forward": buf + stats + copy + forward_tile_bytes * n * w,
            "backward": buf + grads + max(TRL_BACKWARD_TILE_BYTES * n * w, casts)}


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
    if setup.loss is Loss.CHUNKED_NLL:
        return chunked_nll_bytes(spec, setup)
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
