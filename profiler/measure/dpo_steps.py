"""The real TRL ``DPOTrainer`` driving the measured steps (``--trainer dpo``).

The harness's model (random weights, checkpointing as the setup says) goes to
``trl.DPOTrainer`` with a tiny in-memory preference dataset built in code: ``batch x (1 + steps)``
rows of prompt / chosen / rejected text over a word-level tokenizer made here (words ``t2`` ..,
``<pad>`` and ``<eos>``; nothing downloaded, no chat template), each prompt + completion exactly
``seq`` tokens, so the collator's right padding (trl 1.16.0 trl/trainer/dpo_trainer.py:185-202)
adds none and the policy forward sees ``2 x batch`` sequences of ``seq`` (chosen, then rejected:
:169). The reference, by ``Setup.ref_model``:

- separate: a second model built here as the policy's base (same dtype and attention, no
  checkpointing, no adapter), passed as ``ref_model`` (TRL would load one from the policy's hub
  id, :915-927, which a model built from a config has not);
- adapter: the LoRA model goes in as its base model with its ``LoraConfig`` as ``peft_config``,
  so TRL wraps it (:621-664) and the reference is the policy with the adapter disabled
  (``use_adapter(model, None)``, :1328-1336). A ``PeftModel`` passed in would get a second,
  "ref" adapter copied from the first instead (:666-694);
- precomputed: ``precompute_ref_log_probs=True`` and no reference model: the log-probs are
  computed in ``DPOTrainer.__init__`` (:1013-1018), before the measured steps.

Phases, as for SFT (trl_steps.py) with the reference apart: forward is ``compute_loss`` up to the
reference forward (the policy's, :1299), reference the reference forward under ``no_grad``
(:1327-1338: ``ref_model.forward`` or the policy under ``use_adapter``), then backward, optimizer
and zero_grad from the Trainer's loop. The loss and its metrics after the reference forward
(:1349-1601: per-pair scalars and a few per-token vectors) fall between phases.
"""
from __future__ import annotations

import contextlib
import tempfile

from estimator.categories import Category, Phase
from estimator.setup import Mode, RefModel, Setup
from estimator.versions import installed_versions, parse_version
from profiler.measure.build import SetupUnavailable, build_model
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

#: Words of the tokenizer built here besides <pad> (0) and <eos> (1); token ids never change memory
_WORDS = 1024


def _require_trl(trainer: str = "dpo"):
    name = {"dpo": "DPOTrainer", "grpo": "GRPOTrainer"}[trainer]
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError:
        raise SetupUnavailable(f"--trainer {trainer} runs TRL's {name}, and trl is not installed: "
                               "pip install -e '.[trl]' (every other setup still runs)") from None
    have = installed_versions().get("trl", trl.__version__)
    if parse_version(have) < (1, 16, 0):
        raise SetupUnavailable(f"--trainer {trainer} drives trl 1.16's {name}; the installed trl {have}'s was not read")
    return trl


def _tokenizer(eos: int = 1, words: int = _WORDS):
    """A word-level tokenizer over whitespace-separated words ``t2`` .. and <pad> (0), <eos>
    (``eos``; GRPO's harness puts it past the model's vocabulary, grpo_steps.py)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": eos, **{f"t{i}": i for i in range(1, 2 + words) if i != eos}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def preference_rows(ids, rows: int, completion: int | None = None) -> dict[str, list[str]]:
    """``rows`` preference pairs from the synthetic ids (B, seq): a prompt of ``seq - completion``
    tokens (``--completion-only``; None: one token, the estimate's bound), chosen and rejected
    completions filling the sequence (each ending with <eos>, so TRL adds none:
    dpo_trainer.py:1062-1067), as text the tokenizer maps back to ``seq`` tokens."""
    seq = ids.shape[1]
    prompt_len = seq - completion if completion else 1
    words = [[f"t{2 + int(t) % _WORDS}" for t in row] for row in ids.tolist()]
    out: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(rows):
        w = words[i % len(words)]
        completion = w[prompt_len:seq - 1]
        out["prompt"].append(" ".join(w[:prompt_len]))
        out["chosen"].append(" " + " ".join(completion + ["<eos>"]))
        out["rejected"].append(" " + " ".join(completion[::-1] + ["<eos>"]))
    return out


@contextlib.contextmanager
def _reference_phase(trainer, setup: Setup, current):
    """The reference forward as its own phase: ``ref_model.forward`` (separate), or the
    ``use_adapter`` context DPOTrainer disables the adapter in (adapter; dpo_trainer.py:1333),
    wrapped while the steps run and restored after."""
    import trl.trainer.dpo_trainer as dpo

    @contextlib.contextmanager
    def measured():
        current().end()  # the policy's forward ends where the reference's begins
        current().begin(Phase.REFERENCE, Category.ACTIVATIONS)
        try:
            yield
        finally:
            current().end()

    if setup.ref_model is RefModel.SEPARATE:
        ref = trainer.ref_model
        forward = ref.forward

        def ref_forward(*args, **kwargs):
            with measured():
                return forward(*args, **kwargs)

        ref.forward = ref_forward
        try:
            yield
        finally:
            ref.forward = forward
    elif setup.ref_model is RefModel.ADAPTER:
        use_adapter = dpo.use_adapter

        @contextlib.contextmanager
        def measured_adapter(*args, **kwargs):
            with measured(), use_adapter(*args, **kwargs):
                yield

        dpo.use_adapter = measured_adapter
        try:
            yield
        finally:
            dpo.use_adapter = use_adapter
    else:
        yield


def dpo_train_steps(built, spec, setup: Setup, steps: int, tracker, meter, timings, first) -> None:
    """``1 + steps`` optimizer steps of the real ``DPOTrainer``: the first on ``first``, the rest on
    ``meter``, cut into the harness's phases (module docstring)."""
    trl = _require_trl()
    import datasets

    model, peft_config = trl_policy(built, setup, "dpo")
    sim = on_the_sim(built)
    device = built.device
    ref = None
    if setup.ref_model is RefModel.SEPARATE:
        ref = build_model(spec, setup.replace(mode=Mode.FULL, grad_ckpt=False), device)
        tracker.track(ref, Category.WEIGHTS)
    ids = real_ids(spec, setup)
    data = datasets.Dataset.from_dict(preference_rows(ids, setup.batch * setup.grad_accum * (steps + 1),
                                                      setup.completion_only))
    current, phases = trainer_phases(built, tracker, meter, first, timings)

    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out, max_steps=steps + 1, per_device_train_batch_size=setup.batch,
            gradient_accumulation_steps=setup.grad_accum, gradient_checkpointing=setup.grad_ckpt,
            max_length=setup.seq, precompute_ref_log_probs=setup.ref_model is RefModel.PRECOMPUTED,
            use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=0, **_PRECISION_FLAGS[setup.precision])
        with driven_on_the_sim(sim):
            trainer = trl.DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data,
                                     processing_class=_tokenizer(), peft_config=peft_config, callbacks=[phases])
        measure_trainer(trainer, setup, tracker, current, "dpo")
        train_measured(trainer, tracker, sim, _reference_phase(trainer, setup, current))
        del trainer
