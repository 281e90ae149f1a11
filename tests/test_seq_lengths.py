"""--seq-lengths FILE (estimator/lengths.py): reading a length file, the batches the Trainer's
seeded order forms, the worst batch per --packing, and a real SFTTrainer on CPU steps over
variable-length examples: its batches are the ones predicted, in the order predicted, and
every step's peak within the tolerance of the estimate of its batch."""
from __future__ import annotations

import json

import pytest

from estimator.lengths import batch_setup, read_lengths, trainer_batches, worst_batch
from estimator.setup import Packing, Setup

#: estimate vs a real SFTTrainer step's measured peak, per step (issue 24's bound)
STEP_TOLERANCE = 0.01
LENGTHS = [17, 90, 33, 200, 5, 64, 150, 120, 8, 77, 41, 300, 12]
#: the Trainer's seed in the real run: its order puts the longest example in step 4 of 5
SEED = 3


def _sft(**over) -> Setup:
    return Setup(**dict(dict(trainer="sft", loss="chunked-nll", mode="lora", precision="fp32", device="cpu",
                             grad_ckpt=True, lora_targets=("q_proj", "v_proj"), batch=3, seq=256), **over))


@pytest.mark.parametrize("text, want", [
    ("17\n90\n\n# a comment\n33  # three\n", [17, 90, 33]),
    ("100 2\n7 1\n", [100, 100, 7]),
    ("[5, 6, 7]", [5, 6, 7]),
], ids=["lines", "histogram", "json"])
def test_read_lengths(tmp_path, text, want):
    (tmp_path / "l.txt").write_text(text)
    assert read_lengths(tmp_path / "l.txt") == want


@pytest.mark.parametrize("text, message", [
    ("12\nx\n", "line 2: 'x' is not a whole number"),
    ("12 3 4\n", "line 1 has 3 fields"),
    ("0\n", "line 1: a length is a positive whole number, got 0"),
    ("12 -1\n", "a count is a positive whole number"),
    ("[1, 2.5]", "item 2: a length is a positive whole number, got 2.5"),
    ("[1, 2", "not a JSON list of lengths"),
    ("# nothing\n", "no lengths in it"),
    ("5 1000000000\n", "over the 100,000,000 read"),
])
def test_a_bad_length_file_is_one_sentence_and_exit_2(tmp_path, cli, text, message):
    path = tmp_path / "l.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_lengths(path)
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--seq-lengths", str(path))
    assert out.code == 2 and message in out.err and len(out.err.strip().splitlines()) == 1, out.err


def test_seq_lengths_needs_sft_and_seed_needs_seq_lengths(tmp_path, cli):
    (tmp_path / "l.txt").write_text("5\n")
    out = cli("estimate", "smollm2-135m", "--seq-lengths", str(tmp_path / "l.txt"))
    assert out.code == 2 and "pass --trainer sft" in out.err
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--seed", "3")
    assert out.code == 2 and "pass --seq-lengths FILE with it" in out.err
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--seq-lengths", str(tmp_path / "l.txt"),
              "--grad-accum", "2")
    assert out.code == 2 and "leave --grad-accum and --world-size at 1" in out.err


def test_each_batch_is_its_longest_padded_or_its_tokens_flattened():
    padded = batch_setup(_sft(), [300, 12, 64])
    assert (padded.batch, padded.seq, padded.packing) == (3, 256, Packing.PADDED)  # cut to max_length
    even = batch_setup(_sft(), [40, 40])
    assert (even.batch, even.seq, even.packing) == (2, 40, None)  # no padding, so no sdpa mask
    free = batch_setup(_sft(packing="padding-free"), [300, 12, 64])
    assert (free.batch, free.seq, free.packing) == (3, 126, Packing.PADDING_FREE)  # ceil(376 / 3): nothing cut
    assert batch_setup(_sft(packing="packed"), [300, 12]) == _sft(packing="packed")


def test_the_worst_batch_bounds_every_batch_of_the_seeded_order():
    from estimator.estimate import estimate
    from estimator.modelspec import load_model
    spec = load_model("smollm2-135m")

    def peak(s):
        return estimate(spec, s).total_bytes

    for packing in (None, "padding-free"):
        setup = _sft(packing=packing)
        w = worst_batch(setup, LENGTHS, peak)
        assert w.bound_lengths == (300, 200, 150) and (w.examples, w.steps) == (13, 5)
        every = [peak(batch_setup(w.bound, one)) for one in trainer_batches(LENGTHS, 3)]
        assert peak(w.worst) == max(every) <= peak(w.bound)
        assert every.index(max(every)) + 1 == w.step
    packed = worst_batch(_sft(packing="packed"), LENGTHS, peak)
    assert packed.step is None and packed.bound == _sft(packing="packed")


def test_the_cli_reports_the_bound_and_the_seeded_worst(tmp_path, cli):
    (tmp_path / "l.json").write_text(json.dumps(LENGTHS))
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--mode", "lora", "--batch", "3", "--seq", "256",
              "--seq-lengths", str(tmp_path / "l.json"), "--json")
    assert out.code == 0, out.err
    got = json.loads(out.out)
    assert got["setup"]["seq"] == 256 and got["setup"]["packing"] == "padded"
    assert got["seq_lengths"]["bound"]["lengths"] == [300, 200, 150]
    assert got["seq_lengths"]["seeded_worst"]["step"] == 1  # (64, 12, 300): the longest, in the first batch


@pytest.mark.slow
def test_a_real_sft_trainer_reads_the_predicted_batches_and_each_step_is_its_estimate(tmp_path):
    """SmolLM2-135M (all 30 layers), LoRA q/v, fp32, checkpointing, batch 3, max_length 256 over 13
    examples of 5-300 tokens, seed 3, two epochs: the batches the model sees are trainer_batches'
    (shape and tokens, epoch 2 reshuffled with seed + 1), each step's measured peak (VramCallback)
    is within STEP_TOLERANCE of the estimate of its batch, and the seeded worst step (4: the
    300-token example beside two others, 3 x 256) is the measured worst of epoch 1."""
    pytest.importorskip("trl", reason="the real SFTTrainer needs trl (pip install -e '.[trl]')")
    import datasets
    import torch
    import trl
    from peft import LoraConfig

    from estimator.modelspec import load_model
    from profiler.integrations.trainer_callback import VramCallback
    from profiler.measure.build import build_model
    from profiler.measure.run import prediction
    from profiler.measure.trl_steps import _tokenizer
    spec, setup = load_model("smollm2-135m"), _sft()
    torch.manual_seed(0)
    rows = [torch.randint(2, spec.vocab_size, (n,)).tolist() for n in LENGTHS]
    model = build_model(spec, setup.replace(mode="full", lora_targets=(), grad_ckpt=False), "cpu")
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((tuple(kw["input_ids"].shape), int(kw["attention_mask"].sum()))), with_kwargs=True)
    args = trl.SFTConfig(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=3, report_to=[],
                         use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False,
                         max_length=256, seed=SEED)
    lora = LoraConfig(r=setup.lora_rank, lora_alpha=setup.alpha, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with VramCallback(spec=spec, setup=setup, out=tmp_path / "steps.jsonl") as cb:
        trl.SFTTrainer(model=model, args=args, processing_class=_tokenizer(), peft_config=lora,
                       train_dataset=datasets.Dataset.from_dict({"input_ids": rows}), callbacks=[cb]).train()
    predicted = trainer_batches(LENGTHS, 3, SEED) + trainer_batches(LENGTHS, 3, SEED, epoch=1)
    # the forwards: one per step, plus the checkpointed layers' recomputation (not the backbone's)
    assert [s for s in seen] == [((len(b), min(256, max(b))), sum(min(256, n) for n in b)) for b in predicted]
    errors = []
    for record, one in zip(cb.records, predicted, strict=True):
        p = prediction(spec, batch_setup(setup, one), harness=False)
        want = p.first_step["allocated_bytes"] if record.first_step and p.first_step else p.allocated_bytes
        got = record.measured.peak_allocated_bytes
        errors.append((want - got) / got)
    assert max(map(abs, errors)) <= STEP_TOLERANCE, [f"{100 * e:+.2f}%" for e in errors]
    from estimator.estimate import estimate
    w = worst_batch(setup, LENGTHS, lambda s: estimate(spec, s).total_bytes, SEED)
    epoch1 = [r.measured.peak_allocated_bytes for r in cb.records[:5]]
    assert w.step == 4 == 1 + epoch1.index(max(epoch1)), epoch1


def test_the_readme_example_runs(cli):
    """README's --seq-lengths line, with its shipped example histogram (benchmarks/seq-lengths-example.txt)."""
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--mode", "lora", "--batch", "4", "--seq", "2048",
              "--seq-lengths", "benchmarks/seq-lengths-example.txt", "--json")
    assert out.code == 0, out.err
    got = json.loads(out.out)["seq_lengths"]
    assert got["examples"] == 1000 and got["bound"]["lengths"] == [4096] * 4 and got["bound"]["seq"] == 2048
