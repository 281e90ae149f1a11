"""VramCallback on a real ``transformers.Trainer`` run (CPU backend: exact tensor bytes)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from estimator.modelspec import spec_from_config
from estimator.setup import Setup
from profiler.integrations.trainer_callback import VramCallback
from profiler.record import read_records

SEQ = 32
BATCH = 2
STEPS = 3
#: Measured / predicted peak allowed per step. Measured here (torch 2.13, transformers
#: 5.23): steps 2-3 peak at 769,292 B against a predicted 742,272 B (+3.6%); step 1 at
#: 538,540 B against its first-step prediction of 511,616 B (+5.3%). The Trainer itself
#: adds nothing: profiler.measure.run's cpu backend measures 769,788 B for the same case.
#: The gap is the estimator's (its forward/backward activations of this model), so
#: the bound sits about twice the worst error seen, not at the 50% of a loose check.
TOLERANCE = 0.10

CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=128)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the tiny Llama for 3 steps with VramCallback; shared by the tests below."""
    out = tmp_path_factory.mktemp("trainer")
    config = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    spec = spec_from_config(config.to_dict(), name="tiny-llama")
    # The Trainer's default optimizer on torch >= 2.8 is "adamw_torch_fused" (training_args.py):
    # torch.optim.AdamW(fused=True), which allocates no temporaries in step(), unlike the
    # for-loop AdamW the estimator assumes on CPU by default. Say so in the setup.
    setup = Setup(precision="fp32", batch=BATCH, seq=SEQ, device="cpu", optimizer="adamw",
                  optimizer_impl="fused")
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(0, CONFIG["vocab_size"], (SEQ,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    with VramCallback(spec=spec, setup=setup, out=out / "steps.jsonl") as callback:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        assert trainer.args.optim.value == "adamw_torch_fused"  # what the setup above claims
        trainer.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return callback, weights, out / "steps.jsonl"


def test_one_record_per_step_written_and_valid(trained):
    callback, _, path = trained
    assert [r.step for r in callback.records] == [1, 2, 3]
    on_disk = read_records(path)  # validates every line (profiler.record.validate)
    assert [r.measured.peak_allocated_bytes for r in on_disk] == \
        [r.measured.peak_allocated_bytes for r in callback.records]
    first = on_disk[0]
    assert first.schema == 1 and first.status == "ok" and first.backend == "cpu"
    assert first.case.model == "tiny-llama" and first.case.steps == STEPS
    assert first.case.setup["optimizer_impl"] == "fused"
    assert len({r.case_key for r in on_disk}) == 1  # one case, three steps
    assert first.predicted.allocated_bytes > 0


def test_peaks_hold_the_model_states_they_must(trained):
    callback, weights, _ = trained
    for r in callback.records:
        m = r.measured
        assert m.peak_allocated_bytes > weights
        assert m.categories["weights"] >= weights
        # after zero_grad(set_to_none=True) what stays is weights + AdamW's exp_avg and exp_avg_sq
        assert 3 * weights <= m.end_bytes <= 3 * weights + 1024
    for r in callback.records[1:]:  # from step 2 the moments exist for the whole step
        assert r.measured.categories["optimizer_state"] >= 2 * weights


def test_peaks_match_the_estimate_within_tolerance(trained):
    callback, _, _ = trained
    predicted = callback.predicted
    state = predicted.components["optimizer_state"]
    # Step 1's forward and backward run before AdamW creates its state (lazily, in the
    # first step()): its prediction is every phase without the state, but the optimizer's.
    first_step = max(sum(v for k, v in comp.items() if k not in ("allocator", "context"))
                     - (state if phase != "optimizer" else 0)
                     for phase, comp in predicted.phases.items())
    for r in callback.records:
        expected = first_step if r.step == 1 else predicted.allocated_bytes
        ratio = r.measured.peak_allocated_bytes / expected
        assert abs(ratio - 1) <= TOLERANCE, (r.step, r.measured.peak_allocated_bytes, expected)


def test_the_dispatch_mode_is_gone_after_training(trained):
    assert _get_current_dispatch_mode_stack() == []


def test_bad_arguments_are_clear_errors():
    spec = spec_from_config(LlamaConfig(**CONFIG).to_dict(), name="tiny-llama")
    with pytest.raises(ValueError, match="pass spec and setup together"):
        VramCallback(spec=spec)
    with pytest.raises(TypeError, match="setup must be an estimator Setup, got dict"):
        VramCallback(spec=spec, setup={"batch": 2})
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of: cuda, cpu"):
        VramCallback(backend="tpu")
