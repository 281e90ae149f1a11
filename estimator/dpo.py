"""TRL's DPOTrainer step (``--trainer dpo``), as trl 1.16.0 runs it.

``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py:1285) runs, in this order:

1. the policy forward over the collated batch: chosen rows then rejected rows
   (``DataCollatorForPreference``, :169), so ``2 x batch`` sequences, right-padded to the longest
   (:185-202; ``padding_free`` falls back to padding, :732-739), with labels masked to the
   completion (:1298) and the log-probs from the fused LM head (:1299, ``fused_lm_head=True``;
   ``add_fused_lm_head`` with outputs log_probs, entropy, mean_logits and is_top1, :957-960):
   the SFT step's terms at twice the batch (:func:`policy_setup`);
2. the reference forward, under ``torch.no_grad()`` with checkpointing disabled (:1327), *after*
   the policy's, so every activation the policy saved is alive beside it
   (:func:`reference_forward_bytes`): a separate frozen copy (``ref_model``, :1338; its own fused
   head, log_probs only, :961-962) or the policy with its adapter disabled (:1333-1336); with
   ``precompute_ref_log_probs`` none, the log-probs come from the batch (:1318-1319);
3. the sigmoid loss over per-pair scalars and the metrics (:1349-1601): a few per-token vectors.

Backward and the optimizer step are the SFT step's at twice the batch; the reference copy is
weights in every phase (:func:`reference_weight_bytes`). The reference forward is a phase of its
own (``Phase.REFERENCE``).

On CUDA, where Triton folds the tiles, the fused head scores only the labelled rows
(utils.py:1642-1649): the completion tokens, ``--completion-only`` of them per response. Without
it the estimate takes every position but the first as labelled (a one-token prompt), an upper
bound; on the cpu device every position is scored whatever the labels, as measured.
"""
from __future__ import annotations

from dataclasses import replace

from .logits import TRL_FORWARD_TILE_BYTES, fused_head_bytes
from .modelspec import ModelSpec
from .setup import Device, RefModel, Setup

#: Bytes per tile element at the worst moment of the torch fold when only ``log_probs`` are asked
#: (the separate reference's fused head, trl 1.16.0 dpo_trainer.py:962, ``add_fused_lm_head``'s
#: default outputs, utils.py:1552): ``_forward_tile`` (chunked_logprob.py:235-254) at ``e =
#: torch.exp(z - new_m)``: z, z - m and e in fp32 (no ``before_target`` bool without is_top1, no
#: ``e * z`` without entropy). Measured under the tracker on real DPOTrainer steps (results/trl/).
TRL_FORWARD_TILE_BYTES_LOGPROBS = 12


def without_dropout(spec: ModelSpec) -> ModelSpec:
    """The model as DPOTrainer trains it: DPOConfig's ``disable_dropout=True`` (dpo_config.py:185-188)
    sets every ``nn.Dropout``'s p to 0 in the policy and the reference (dpo_trainer.py:931-935,
    utils.py:194-197 ``disable_dropout_in_model``): no dropout masks, and sdpa on the cpu device
    keeps its fused kernel (kernels.py: dropout sends it to the math kernel)."""
    if not (spec.attn_dropout or spec.resid_dropout or spec.embd_dropout):
        return spec
    return replace(spec, attn_dropout=0.0, resid_dropout=0.0, embd_dropout=0.0)


def policy_setup(setup: Setup) -> Setup:
    """The policy's forward and backward: chosen and rejected in one batch of ``2 x batch``."""
    return setup.replace(batch=2 * setup.batch)


def has_reference_forward(setup: Setup) -> bool:
    """Whether the step runs a reference forward (not with precomputed log-probs)."""
    return setup.ref_model is not RefModel.PRECOMPUTED


def reference_forward_bytes(spec: ModelSpec, policy: Setup, head_input: int, layer_transient: int) -> dict[str, int]:
    """What the reference forward adds, at its worst moment, to what the policy's forward left
    (``policy`` is :func:`policy_setup`'s, at ``2 x batch``): ``activations`` and ``logits`` to put
    in place of the forward's, given the policy's saved activations.

    When the policy's forward returns, its final hidden states (``head_input``, where the
    activations count them: a trainable head saves its input, which the fused head does not)
    are freed, and what its fused head saved stays: the (N, h) copy of the shifted hidden states
    (``reshape(-1, h)`` of a (2b, s - 1, h) slice, utils.py:1645; N = 2b (s - 1)) and a few (N,)
    vectors. The reference forward then peaks inside a layer (the no-grad working set,
    ``layer_transient``) or at its fused head: its final hidden states (2b, s, h), their (N, h)
    copy, the tile buffer, the statistics and the fold's temporaries (``fused_head_bytes``; the
    separate reference asks log_probs only, the adapter reference the policy's outputs)."""
    p, h = policy.precision.compute_bytes, spec.embed_dim or spec.hidden_size
    T, N = policy.batch * policy.seq, policy.batch * (policy.seq - 1)
    if policy.completion_only and policy.device is Device.CUDA:
        N = policy.batch * policy.completion_only  # the responses' rows (Triton's compact path)
    tile = TRL_FORWARD_TILE_BYTES_LOGPROBS if policy.ref_model is RefModel.SEPARATE else TRL_FORWARD_TILE_BYTES
    triton = policy.device is Device.CUDA
    head = fused_head_bytes(rows=N, vocab=spec.vocab_size, hidden=h, compute_bytes=p, head_trains=False,
                            triton=triton, copies_rows=True, autocast=policy.precision.is_autocast,
                            forward_tile_bytes=tile)["forward"]
    kept = p * N * h - head_input  # the policy head's saved copy, its input freed
    at_head = p * T * h  # the reference's final hidden states (its copy is in ``head``)
    if head + at_head >= layer_transient:
        return {"activations": kept + at_head, "logits": head}
    return {"activations": kept + layer_transient, "logits": 0}


def reference_weight_bytes(spec: ModelSpec, setup: Setup, base_weights: int) -> int:
    """The separate reference's weights: the policy's base model again, frozen, in its dtype
    (dpo_trainer.py:924-927 ``dtype=self.model.dtype``; quantized as the policy with QLoRA,
    :917-918); none with the adapter disabled or precomputed log-probs (:909-914)."""
    return base_weights if setup.ref_model is RefModel.SEPARATE else 0
