"""VramCallback on a real ``transformers.Trainer`` run (CPU backend: exact tensor bytes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from estimator.modelspec import spec_from_config
from estimator.setup import Setup
from profiler.analysis.validate import validate
from profiler.integrations.trainer_callback import VramCallback
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
BATCH = 1
STEPS = 3
ACCUM = 2
#: Measured / predicted peak per step, first step against the estimate's first step: the
#: issue's 1 % (measured here: within 0.1 %, torch 2.13 / transformers 5.24).
TOLERANCE = 0.01


def _dataset(vocab: int, n: int = 16):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (SEQ,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SmolLM2-135M (135M parameters, built from its config) for 3 optimizer steps of 2
    micro-batches, with a bare VramCallback(): it reads the setup from the Trainer."""
    out = tmp_path_factory.mktemp("trainer")
    raw = json.loads((ROOT / "estimator" / "data" / "models" / "smollm2-135m.json").read_text())
    raw.pop("_vramlab_source", None)
    config = LlamaConfig(**raw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    with VramCallback(out=out / "steps.jsonl") as callback:
        trainer = Trainer(model=model, args=args, train_dataset=_dataset(config.vocab_size), callbacks=[callback])
        trainer.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return callback, weights, out / "steps.jsonl"


@pytest.mark.slow
def test_the_setup_is_read_from_the_trainer(trained):
    callback, _, _ = trained
    s = callback.setup
    assert (s.batch, s.seq, s.grad_accum, s.precision.value, s.device.value) == (BATCH, SEQ, ACCUM, "fp32", "cpu")
    # the Trainer's default on torch >= 2.8 is adamw_torch_fused (training_args.py)
    assert (s.optimizer.value, s.optimizer_impl.value) == ("adamw", "fused")
    assert callback.predicted.params >= 100_000_000  # a realistic size: SmolLM2-135M


def test_training_ends_with_a_one_line_summary_and_validate_reads_the_records(tmp_path, capsys, cli):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    out = tmp_path / "steps.jsonl"
    capsys.readouterr()
    with VramCallback(out=out) as cb:
        Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=_dataset(128), callbacks=[cb]).train()
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("vramlab:")]
    assert printed == [cb.summary()]
    assert "2 steps" in printed[0] and "(precision fp32)" in printed[0] and "estimate" in printed[0]
    assert f"vramlab validate {out}" in printed[0]
    result = cli("validate", str(out))  # what the line tells the user to run
    assert result.code == 0 and "2 cases" in result.out, result.err


@pytest.mark.slow
def test_one_record_per_step_written_and_valid(trained):
    callback, _, path = trained
    assert [r.step for r in callback.records] == [1, 2, 3]
    assert [r.first_step for r in callback.records] == [True, False, False]
    on_disk = read_records(path)  # checks every line against the schema
    assert on_disk == callback.records
    first = on_disk[0]
    assert first.ok and first.backend == "cpu" and first.case.steps == STEPS
    assert first.case.setup["grad_accum"] == ACCUM and first.predicted.allocated_bytes > 0
    assert len({r.case_key for r in on_disk}) == 1  # one case, three steps


@pytest.mark.slow
def test_peaks_hold_the_model_states_they_must(trained):
    callback, weights, _ = trained
    for r in callback.records:
        m = r.measured
        assert m.peak_allocated_bytes > weights and m.categories["weights"] >= weights
        # after model.zero_grad() what stays is weights + AdamW's exp_avg and exp_avg_sq
        assert 3 * weights <= m.end_bytes <= 3 * weights + 2**20
    for r in callback.records[1:]:  # from step 2 the moments exist for the whole step
        assert r.measured.categories["optimizer_state"] >= 2 * weights


@pytest.mark.slow
def test_peaks_match_the_estimate_within_one_percent(trained):
    callback, _, _ = trained
    p = callback.predicted
    for r in callback.records:
        expected = p.first_step["allocated_bytes"] if r.first_step and p.first_step else p.allocated_bytes
        got = r.measured.peak_allocated_bytes
        assert abs(expected - got) <= TOLERANCE * got, (r.step, got, expected)


@pytest.mark.slow
def test_validate_compares_the_first_step_with_the_first_step_estimate(trained):
    callback, _, _ = trained
    result = validate(callback.records)  # the first record against the first-step estimate
    assert result.summaries["uncalibrated"]["max"] <= TOLERANCE
    peak_phase = callback.records[0].measured.peak_phase
    assert result.rows[0].categories_predicted == callback.predicted.tensors_at(peak_phase, first_step=True)


def test_given_spec_and_setup_are_used(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)
    spec = spec_from_config(config.to_dict(), name="tiny-llama")
    setup = Setup(precision="fp32", batch=2, seq=SEQ, device="cpu", optimizer_impl="fused")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    with VramCallback(spec=spec, setup=setup) as cb:
        Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=_dataset(128), callbacks=[cb]).train()
    assert cb.setup is setup and cb.records[0].case.model == "tiny-llama" and cb.records[0].first_step


@pytest.mark.slow
def test_the_dispatch_mode_is_gone_after_training(trained):
    assert _get_current_dispatch_mode_stack() == []


def test_bad_arguments_are_clear_errors():
    spec = spec_from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=128).to_dict(), name="tiny-llama")
    with pytest.raises(ValueError, match="pass spec and setup together"):
        VramCallback(spec=spec)
    with pytest.raises(TypeError, match="setup must be an estimator Setup, got dict"):
        VramCallback(spec=spec, setup={"batch": 2})
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of: cuda, cpu"):
        VramCallback(backend="tpu")


# --- issue 26, item 5: optimizer state that is not a tensor; any exit path leaves no mode behind ---
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)


def _tiny_trainer(tmp_path, callback, steps: int = 2, **kw):
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=1, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, **kw)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    return Trainer(model=model, args=args, train_dataset=_dataset(TINY["vocab_size"]), callbacks=[callback]), model


def _fail_at_forward(model, call: int):
    """Make the model's ``call``-th forward raise, as a bug in a training step would."""
    seen = []

    def hook(module, args):
        seen.append(1)
        if len(seen) == call:
            raise RuntimeError("a bug in the step")
    model.register_forward_pre_hook(hook)


def test_adafactor_and_its_int_step_are_tracked(tmp_path):
    callback = VramCallback()  # Adafactor keeps state["step"] as a Python int (transformers optimization.py)
    trainer, model = _tiny_trainer(tmp_path, callback, optim="adafactor")
    trainer.train()
    assert callback.setup.optimizer.value == "adafactor"
    assert [r.status.value for r in callback.records] == ["ok", "ok"]
    # from step 2 Adafactor's factored second moments exist for the whole step: row + column
    # statistics per matrix, so more than nothing and far less than one copy of the weights
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = callback.records[1].measured.categories["optimizer_state"]
    assert 0 < state < weights
    assert _get_current_dispatch_mode_stack() == []


def test_an_exception_in_training_leaves_no_dispatch_mode_without_a_with_block(tmp_path):
    callback = VramCallback()
    trainer, model = _tiny_trainer(tmp_path, callback, steps=3)
    _fail_at_forward(model, call=2)
    with pytest.raises(RuntimeError, match="a bug in the step"):
        trainer.train()
    assert _get_current_dispatch_mode_stack() == []
    assert [(r.step, r.status.value) for r in callback.records] == [(1, "ok"), (2, "error")]
    assert "a bug in the step" in callback.records[1].message


def test_a_failing_record_write_still_leaves_no_mode_and_no_hooks(tmp_path):
    unwritable = tmp_path / "folder.jsonl"
    unwritable.mkdir()  # the step's failure record cannot be appended here
    with pytest.raises((ValueError, OSError), match="[Ii]s a directory"):
        with VramCallback(out=unwritable) as callback:
            trainer, model = _tiny_trainer(tmp_path, callback)
            _fail_at_forward(model, call=1)
            trainer.train()
    assert _get_current_dispatch_mode_stack() == []
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert "_init_group" not in vars(optimizer)  # the tracker's patch of the optimizer is gone too
