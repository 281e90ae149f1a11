"""TRL's GRPOTrainer step (``--trainer grpo``), as trl 1.16.0 runs it with ``model.generate``.

``GRPOTrainer._prepare_inputs`` (trl/trainer/grpo_trainer.py:1522) generates once per optimizer
step (``steps_per_generation`` = ``gradient_accumulation_steps`` by default, grpo_config.py:1098-1100)
for the whole generation batch, then ``training_step`` runs ``_compute_loss`` (:3020) on each
micro-batch:

1. generation (``Phase.GENERATE``, :1763-1891 ``_generate_single_turn``): the prompts, left-padded,
   go through ``unwrapped_model.generate`` under ``torch.no_grad()`` (:1862-1875) with checkpointing
   disabled (``unwrap_model_for_generation``, trl/models/utils.py:202): ``batch x grad_accum``
   sequences (``num_generations`` per prompt, the RepeatSampler, :1280-1316), the KV cache growing
   from the prompt's ``seq`` to ``seq + max_completion``; beside the model states as the previous
   step left them (``model.zero_grad()`` freed the gradients; the optimizer's state stays) --
   :func:`generation_setup`;
2. the no-grad log-prob passes (``Phase.LOGPROB``, :2635-2740): ``old_per_token_logps`` only when
   ``gradient_accumulation_steps % (steps_per_generation x num_iterations) != 0`` (:2642-2645), so
   with ``--num-iterations`` above 1 (its default 1, grpo_config.py:689-692): the policy, checkpointing
   off, over the generation batch ``batch`` sequences at a time (:2646-2655, :1427-1433), with its
   fused head (:func:`logprob_pass_bytes`); the reference's only with ``--beta`` not 0 (:2710; its
   default 0.0, grpo_config.py:681-688, has no reference model either, grpo_trainer.py:983-986):
   :func:`has_reference_pass`, :func:`reference_weight_bytes`;
3. training (``Phase.FORWARD`` .. ``ZERO_GRAD``): ``_get_per_token_logps_and_entropies`` (:1419) on
   ``prompt + completion`` tokens with labels masked to the completion (:1495-1496) and the fused LM
   head (:1498 ``fused_lm_head=True``; ``add_fused_lm_head`` with outputs log_probs and entropy,
   :1068-1073): the SFT step's terms at ``seq + max_completion`` (:func:`training_setup`);
   ``logits_to_keep`` slices the (B, P + C - 1) outputs to the completion (:1499-1501: views), and
   the loss (:3083-3180, the default "dapo") is a few (B, C) fp32 vectors beside it. TRL's
   selective log-softmax over full logits is gone from 1.16 (the fused head never makes them).

Colocated vLLM (``use_vllm=True, vllm_mode="colocate"``) is out of scope: its engine's weights and
cache are allocated outside torch's tracker and sized by ``vllm_gpu_memory_utilization``.

On CUDA, where Triton folds the tiles, the fused head scores only the labelled rows
(utils.py:1642-1649): the completion tokens, ``batch x max_completion``; on the cpu device every
position but the last is scored whatever the labels (:func:`scored_rows`).
"""
from __future__ import annotations

from .logits import TRL_FORWARD_TILE_BYTES_ENTROPY, fused_head_bytes
from .modelspec import ModelSpec
from .setup import Device, Loss, Mode, Setup, Trainer


def training_setup(setup: Setup) -> Setup:
    """The policy's forward and backward: ``batch`` sequences of prompt + completion."""
    return setup.replace(seq=setup.seq + setup.max_completion)


def generation_setup(setup: Setup) -> Setup:
    """``model.generate`` as an inference setup: every completion of the generation batch
    (``batch x grad_accum`` on this rank), the prompt prefilled and ``max_completion`` tokens
    decoded. The weights are the training setup's (the estimate keeps them)."""
    return setup.replace(trainer=Trainer.HF, mode=Mode.INFERENCE, batch=setup.batch * setup.grad_accum,
                         new_tokens=setup.max_completion, num_generations=None, max_completion=None,
                         num_iterations=None, beta=None,
                         grad_accum=1, grad_ckpt=False, loss=Loss.CAUSAL_LM, world_size=1,
                         sharding="none", lora_targets=setup.lora_targets)


def has_logprob_pass(setup: Setup) -> bool:
    """Whether TRL runs the no-grad ``old_per_token_logps`` pass: ``gradient_accumulation_steps %
    (steps_per_generation x num_iterations)`` is not 0 (:2642-2645) with ``steps_per_generation`` =
    ``gradient_accumulation_steps`` (grpo_config.py:1098-1100), i.e. ``num_iterations`` > 1."""
    return setup.num_iterations > 1


def has_reference_pass(setup: Setup) -> bool:
    """Whether TRL computes the reference's log-probs (``beta != 0.0``, :2710): after the old
    log-probs, in the same ``no_grad`` block with checkpointing off (:2631-2633), over the
    generation batch ``batch`` sequences at a time, through the reference's own fused head (a
    separate copy: log_probs only, :1075-1078) or the policy's with its adapter disabled
    (``use_adapter``, :2725-2737). Its worst moment is :func:`logprob_pass_bytes`': the same model
    and shapes (the log_probs-only fold holds 12 bytes a tile element too, dpo.py)."""
    return bool(setup.beta)


def reference_weight_bytes(setup: Setup, base_weights: int) -> int:
    """A separate reference under full fine-tuning: ``create_model_from_path`` of the policy's
    checkpoint in the policy's dtype (:991-1003 ``dtype=self.model.dtype``), frozen, kept for the
    run; none with LoRA (the adapter disabled, :987-990) or beta 0 (:984-986)."""
    return base_weights if setup.beta and setup.mode is Mode.FULL else 0


def logprob_pass_bytes(spec: ModelSpec, train: Setup, layer_transient: int) -> dict[str, int]:
    """The no-grad log-prob pass's worst moment over one micro-batch (``train``:
    :func:`training_setup`'s, ``batch`` sequences of prompt + completion), beside the model
    states: ``activations`` and ``logits`` beyond them. Inside a layer, the no-grad working set
    (``layer_transient``); or at the fused head (:1498, log_probs and entropy: utils.py:1616-1649),
    the final hidden states (b, s, h), and what ``ChunkedLogProbFunction`` holds in forward: the
    (N, h) copy of the shifted rows (``reshape(-1, h)`` of more than one sequence, or
    ``hidden_states[mask]`` on CUDA), the tile buffer, the statistics and the fold's temporaries."""
    p, h = train.precision.compute_bytes, spec.embed_dim or spec.hidden_size
    cuda = train.device is Device.CUDA
    head = fused_head_bytes(rows=scored_rows(train), vocab=spec.vocab_size, hidden=h, compute_bytes=p,
                            head_trains=False, triton=cuda, copies_rows=train.batch > 1,
                            autocast=train.precision.is_autocast,
                            forward_tile_bytes=TRL_FORWARD_TILE_BYTES_ENTROPY)["forward"]
    at_head = p * train.batch * train.seq * h
    if head + at_head >= layer_transient:
        return {"activations": at_head, "logits": head}
    return {"activations": layer_transient, "logits": 0}


def scored_rows(setup: Setup) -> int:
    """The rows the fused head scores in the training forward (``training_setup``'s ``setup``):
    the completion tokens on CUDA (Triton's compact path, utils.py:1642-1645), every position but
    the last elsewhere."""
    if setup.device is Device.CUDA:
        return setup.batch * setup.max_completion
    return setup.batch * (setup.seq - 1)
