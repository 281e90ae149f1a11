"""What a trainer decides by default, per library version (TRL's SFTTrainer).

A flag the user gives wins; what is left out takes the trainer's default under the assumed
versions (``Setup.versions`` over the installed ones, estimator/versions.py):

- loss: SFTConfig's ``loss_type`` is ``"chunked_nll"`` from trl 1.7, the model's own
  causal-LM loss before (``Semantics.sft_loss_chunked``);
- gradient checkpointing: on from trl 0.22 (``Semantics.sft_grad_ckpt_default``);
- precision: SFTConfig sets ``bf16=True`` unless ``fp16`` (trl 1.16.0
  trl/trainer/base_config.py:108) and SFTTrainer loads a model id with ``dtype="auto"``:
  bf16 checkpoints train as the ``bf16`` recipe, the setup's default already (setup.Precision).
"""
from __future__ import annotations

from .setup import Loss, Trainer
from .versions import semantics_for


def trainer_defaults(trainer: Trainer | str, versions: tuple[tuple[str, str], ...] = ()) -> dict:
    """The setup fields ``trainer`` sets when the user leaves them out, under ``versions``
    (pairs over the installed ones): ``{}`` for the HF Trainer."""
    trainer = Trainer.parse(trainer)
    if trainer is not Trainer.SFT:
        return {}
    sem = semantics_for(tuple(versions))
    return {"loss": Loss.CHUNKED_NLL if sem.sft_loss_chunked else Loss.CAUSAL_LM,
            "grad_ckpt": sem.sft_grad_ckpt_default}
