"""The real TRL ``GRPOTrainer`` driving the measured steps (``--trainer grpo``).

The harness's model (random weights, checkpointing as the setup says) goes to
``trl.GRPOTrainer`` with a tiny in-memory prompt dataset built in code and a reward function
written here (the completion's length; nothing downloaded, no chat template, no vLLM:
``use_vllm=False``, generation with ``model.generate``, trl 1.16.0 trl/trainer/grpo_trainer.py:1873).
Each prompt is ``seq`` words of a word-level tokenizer built here over the model's whole
vocabulary (dpo_steps._tokenizer), so every prompt is ``seq`` tokens and the left padding
(:1827-1838) adds none; its ``<eos>`` is the id past the vocabulary, which the model never
samples, so every completion runs to ``max_completion`` tokens (the estimate's length) and the
right padding (:2446-2458) adds none either.

GRPOConfig's defaults otherwise: ``steps_per_generation = gradient_accumulation_steps``
(grpo_config.py:1098-1100), so one ``generate`` per optimizer step over ``batch x grad_accum``
completions (``num_generations`` per prompt, RepeatSampler, :1280-1316); ``beta`` as the setup says
(its default 0.0: no reference, :983-986; LoRA with beta: the adapter disabled, :987-990; full
fine-tuning: TRL loads a frozen copy from the policy's checkpoint path, :991-1003, so the harness
saves the random-init policy to a temporary folder first and names it in the config, the copy
loaded inside the tracker as the real run loads it); ``num_iterations`` as the setup says, above 1
a no-grad log-prob pass after generation (:2642-2657); LoRA goes in as ``peft_config`` (TRL wraps the model, :433-476).

Phases: generate is ``_generate_single_turn`` (the padding, ``model.generate`` under no_grad with
checkpointing off, the EOS mask; :1763-1891), logprob the no-grad ``_get_per_token_logps_and_entropies``
(:2646-2655, with ``num_iterations`` > 1) and the reference's (:2710-2737, with ``beta``), then
the Trainer's loop as for SFT (trl_steps.py):
forward is ``compute_loss`` (the fused head's log-probs and entropy and the loss, :3020),
backward, optimizer, zero_grad. The rewards and advantages between generate and forward
(:2750-2905, per-completion scalars) fall between phases.
"""
from __future__ import annotations

import tempfile

import torch

from estimator.categories import Category, Phase
from estimator.setup import Setup
from profiler.measure.dpo_steps import _require_trl, _tokenizer
from profiler.measure.sim import driven_on_the_sim
from profiler.measure.trl_steps import (
    _PRECISION_FLAGS,
    measure_trainer,
    on_the_sim,
    real_ids,
    train_measured,
    trainer_phases,
    trl_policy,
)


def prompt_rows(ids, rows: int, vocab: int) -> dict[str, list[str]]:
    """``rows`` prompts from the synthetic ids (B, seq), each the ``seq`` words ``t1`` .. of
    :func:`dpo_steps._tokenizer` over ``vocab`` ids (0 is its <pad>)."""
    words = [" ".join(f"t{1 + int(t) % (vocab - 1)}" for t in row) for row in ids.tolist()]
    return {"prompt": [words[i % len(words)] for i in range(rows)]}


def completion_length(completions, **kwargs) -> list[float]:
    """The reward: each completion's length in characters (any function of the text would do)."""
    return [float(len(c)) for c in completions]


def grpo_train_steps(built, spec, setup: Setup, steps: int, tracker, meter, timings, first) -> None:
    """``1 + steps`` optimizer steps of the real ``GRPOTrainer``: the first on ``first``, the rest on
    ``meter``, cut into the harness's phases (module docstring)."""
    trl = _require_trl("grpo")
    import datasets

    model, peft_config = trl_policy(built, setup, "grpo")
    sim = on_the_sim(built)
    device = built.device
    V = spec.vocab_size
    ids = real_ids(spec, setup)
    data = datasets.Dataset.from_dict(prompt_rows(ids, setup.batch * setup.grad_accum * (steps + 1), V))
    current, phases = trainer_phases(built, tracker, meter, first, timings)

    with tempfile.TemporaryDirectory() as out:
        if setup.beta and peft_config is None:
            # GRPOTrainer builds the reference with create_model_from_path(config._name_or_path) (:1003)
            model.save_pretrained(f"{out}/policy")
            model.config._name_or_path = f"{out}/policy"
        config = trl.GRPOConfig(
            output_dir=out, max_steps=steps + 1, per_device_train_batch_size=setup.batch,
            gradient_accumulation_steps=setup.grad_accum, gradient_checkpointing=setup.grad_ckpt,
            num_generations=setup.num_generations, max_completion_length=setup.max_completion,
            num_iterations=setup.num_iterations, beta=setup.beta or 0.0,
            use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=0, **_PRECISION_FLAGS[setup.precision])
        with driven_on_the_sim(sim):
            trainer = trl.GRPOTrainer(model=model, reward_funcs=completion_length, args=config, train_dataset=data,
                                      processing_class=_tokenizer(eos=V, words=V - 2), peft_config=peft_config,
                                      callbacks=[phases])
        if trainer.ref_model is not None:
            # from_pretrained maps the reference's safetensors into memory (its storages made by no
            # op the tracker sees); on a GPU they are allocated at load, so they count from here
            tracker.track(trainer.ref_model, Category.WEIGHTS)
        measure_trainer(trainer, setup, tracker, current, "grpo")
        generate = trainer._generate_single_turn

        def measured_generate(*args, **kwargs):
            with current()(Phase.GENERATE, Category.KV_CACHE):
                return generate(*args, **kwargs)

        trainer._generate_single_turn = measured_generate
        logps = trainer._get_per_token_logps_and_entropies

        def measured_logps(*args, **kwargs):
            if torch.is_grad_enabled():  # the training forward's, inside compute_loss
                return logps(*args, **kwargs)
            with current()(Phase.LOGPROB, Category.ACTIVATIONS):
                return logps(*args, **kwargs)

        trainer._get_per_token_logps_and_entropies = measured_logps
        train_measured(trainer, tracker, sim)
        del trainer
