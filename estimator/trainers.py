"""What a trainer decides by default, per library version (TRL's SFTTrainer and DPOTrainer).

A flag the user gives wins; what is left out takes the trainer's default under the assumed
versions (``Setup.versions`` over the installed ones, estimator/versions.py):

- loss: SFTConfig's ``loss_type`` is ``"chunked_nll"`` from trl 1.7, the model's own
  causal-LM loss before (``Semantics.sft_loss_chunked``);
- gradient checkpointing: on from trl 0.22 (``Semantics.sft_grad_ckpt_default``);
- precision: SFTConfig sets ``bf16=True`` unless ``fp16`` (trl 1.16.0
  trl/trainer/base_config.py:108) and SFTTrainer loads a model id with ``dtype="auto"``:
  bf16 checkpoints train as the ``bf16`` recipe, the setup's default already (setup.Precision).

GRPOTrainer (trl 1.16.0, ``Semantics.grpo_read``; estimator/grpo.py): the fused LM head with
log-probs and entropy (grpo_trainer.py:1068-1073), checkpointing on (base_config.py:62), and
GRPOConfig's ``num_generations`` 8, ``max_completion_length`` 512 and ``num_iterations`` 1
(grpo_config.py:480-497, :689-692; :GRPO_DEFAULTS); ``beta`` 0.0 (:681-688: no reference model)
unless ``--beta`` is given. A no-grad log-prob pass runs with ``num_iterations`` > 1
(grpo_trainer.py:2642-2657), and the reference's with ``beta`` not 0 (:2710-2737).

SFTTrainer's ``--packing`` (setup.Packing) changes the shape the step sees (:func:`step_setup`).

DPOTrainer (trl 1.16.0, the release read; ``Semantics.dpo_read``):

- loss: the fused LM head for the policy and the reference (trl/trainer/dpo_trainer.py:954-962),
  whatever DPOConfig's ``loss_type`` (``["sigmoid"]``, dpo_config.py:245-247: a few per-pair
  scalars beside it);
- gradient checkpointing: on, DPOConfig's base default as for SFT (trl/trainer/base_config.py:62);
- reference: ``Setup.ref_model`` resolves TRL's own choice by the mode (setup.RefModel);
- padding_free: DPOConfig's flag warns and falls back to padding (dpo_trainer.py:732-739), so
  chosen and rejected are right-padded to the batch's longest (``DataCollatorForPreference``,
  :185-202); ``max_length`` 1024 truncates each sequence (dpo_config.py:195, :153-165): the
  setup's ``seq`` is that padded length.
"""
from __future__ import annotations

from .modelspec import ModelSpec
from .setup import Loss, Mode, Packing, Setup, Trainer
from .versions import semantics_for

#: GRPOConfig's defaults for the knobs left out (trl 1.16.0 grpo_config.py:480-497, :689-692)
GRPO_DEFAULTS = {"num_generations": 8, "max_completion": 512, "num_iterations": 1}


def trainer_defaults(trainer: Trainer | str, versions: tuple[tuple[str, str], ...] = ()) -> dict:
    """The setup fields ``trainer`` sets when the user leaves them out, under ``versions``
    (pairs over the installed ones): ``{}`` for the HF Trainer."""
    trainer = Trainer.parse(trainer)
    if trainer in (Trainer.DPO, Trainer.GRPO):
        return {"loss": Loss.CHUNKED_NLL, "grad_ckpt": semantics_for(tuple(versions)).sft_grad_ckpt_default}
    if trainer is not Trainer.SFT:
        return {}
    sem = semantics_for(tuple(versions))
    return {"loss": Loss.CHUNKED_NLL if sem.sft_loss_chunked else Loss.CAUSAL_LM,
            "grad_ckpt": sem.sft_grad_ckpt_default}


def input_leaf_bytes(spec: ModelSpec, setup: Setup) -> int:
    """What TRL's trainers keep for a peft model with checkpointing: they call
    ``model.enable_input_require_grads()`` (trl 1.16.0 sft_trainer.py:897-900, dpo_trainer.py:715-718,
    grpo_trainer.py:528-530),
    whose hook turns the embedding's output, a frozen lookup, into a leaf that requires grad
    (transformers 5.24 modeling_utils.py:2153-2154 ``output.requires_grad_(True)``); its
    AccumulateGrad node keeps it alive until backward reaches the embedding. Where that output is the
    first layer's input, checkpointing saves it anyway; where learned positions are added to it
    (GPT-2, OPT) it is one more (b, s, e) tensor, through forward and backward (measured on GPT-2 LoRA
    DPOTrainer steps, results/trl/). Embeddings scaled before the first layer (Gemma) would keep one
    too: not measured, not counted."""
    if setup.trainer not in (Trainer.SFT, Trainer.DPO, Trainer.GRPO) or setup.mode not in (Mode.LORA, Mode.QLORA) \
            or not setup.grad_ckpt or not spec.learned_positions:
        return 0
    return setup.precision.param_bytes * (spec.embed_dim or spec.hidden_size) * setup.batch * setup.seq


def step_setup(setup: Setup) -> Setup:
    """The setup as the model's forward sees it under ``--packing`` (setup.Packing): packed and
    padding-free flatten the batch into one row of batch x seq tokens (trl 1.16.0
    sft_trainer.py:187-212), so batch 1 and seq batch x seq; the one example of a padding-free
    batch of 1, and a padded batch of 1, have nothing to tell apart from a row of equal length
    (no padding; position_ids of one sequence: transformers 5.24 masking_utils.py:761-762 finds
    no packing), so they are that. What stays ``packing`` gets an sdpa mask in every layer
    (kernels.masked_layers)."""
    packing = setup.packing
    if packing is None:
        return setup
    if packing is Packing.PACKED or (packing is Packing.PADDING_FREE and setup.batch > 1):
        return setup.replace(batch=1, seq=setup.batch * setup.seq)
    return setup if setup.batch > 1 else setup.replace(packing=None)
