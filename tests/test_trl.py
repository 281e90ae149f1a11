"""TRL's trainers (issue 24): the optional extra, ``--trainer sft``'s defaults per trl version,
the fused LM head's bytes (``--loss chunked-nll``) and the real ``SFTTrainer`` on CPU steps.

The estimator's part runs without trl; what needs trl skips, saying why, without it."""
from __future__ import annotations

import json

import pytest

from estimator.categories import TENSOR_CATEGORIES, Category, Phase
from estimator.estimate import estimate
from estimator.logits import TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK, fused_head_bytes
from estimator.modelspec import load_model
from estimator.setup import Loss, Setup, Trainer
from estimator.trainers import trainer_defaults

NO_TRL = "trl is not installed: pip install -e '.[trl]' (the test extra has it)"
#: The issue's bound, estimate vs a real SFTTrainer step, per phase
SFT_TOLERANCE = 0.01


def _trl():
    return pytest.importorskip("trl", reason=NO_TRL)


def test_trl_imports_with_the_installed_transformers_and_peft():
    trl = _trl()
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), f"modelled from trl 1.16's source; installed {trl.__version__}"


# --- the trainer's defaults, per trl version ---------------------------------------------

@pytest.mark.parametrize("trl,loss,ckpt", [("1.16", Loss.CHUNKED_NLL, True), ("1.7", Loss.CHUNKED_NLL, True),
                                           ("1.6", Loss.CAUSAL_LM, True), ("0.21", Loss.CAUSAL_LM, False)])
def test_sft_defaults_follow_the_trl_version(trl, loss, ckpt):
    assert trainer_defaults("sft", (("trl", trl),)) == {"loss": loss, "grad_ckpt": ckpt}
    assert trainer_defaults("hf") == {}


def test_the_flags_take_the_sft_defaults_and_override_them(cli):
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--versions", "trl=1.16", "--json")
    assert out.code == 0, out.err
    setup = json.loads(out.out)["setup"]
    assert (setup["trainer"], setup["loss"], setup["grad_ckpt"]) == ("sft", "chunked-nll", True)
    out = cli("estimate", "smollm2-135m", "--trainer", "sft", "--no-grad-ckpt", "--versions", "trl=1.6", "--json")
    setup = json.loads(out.out)["setup"]
    assert (setup.get("loss", "causal-lm"), setup["grad_ckpt"]) == ("causal-lm", False)  # the default is left out
    assert "trainer" not in Setup().to_dict()  # the default: records keep their case keys


@pytest.mark.parametrize("argv,match", [
    (["--loss", "chunked-nll"], "pass --trainer sft"),
    (["--trainer", "sft", "--mode", "eval"], "--trainer sft trains"),
    (["--trainer", "sft", "--loss", "logits-sum"], "computes its own loss"),
    (["--trainer", "sft", "--loop", "manual"], "leave --loop trainer"),
    (["--trainer", "sft", "--sharding", "fsdp", "--world-size", "2"], "not modelled yet"),
    (["--trainer", "dpo"], "unknown trainer 'dpo'"),
])
def test_bad_trainer_flags_are_one_sentence_and_exit_2(cli, argv, match):
    out = cli("estimate", "gpt2", *argv)
    assert out.code == 2 and match in out.err and out.err.count("\n") == 1, out.err


def test_matrices_take_the_trainer_defaults(tmp_path):
    from profiler.sweeps.matrix import load_matrix
    path = tmp_path / "m.toml"
    path.write_text('[[cases]]\nmodel = "gpt2"\ntrainer = "sft"\nversions = "trl=1.16"\n')
    (_, setup, _), = load_matrix(path)
    assert (setup.trainer, setup.loss, setup.grad_ckpt) == (Trainer.SFT, Loss.CHUNKED_NLL, True)


# --- the fused LM head's bytes -------------------------------------------------------------

def test_the_fused_head_never_makes_the_logits():
    # Qwen3's 151,936-token vocabulary, 8k tokens: the causal-LM loss's fp32 logits alone are
    # 4 x T x V; the fused head's tile buffer is [4096 x 32768] whatever T and V
    qwen = load_model("qwen3-0.6b")
    setup = Setup(trainer="sft", loss="chunked-nll", mode="lora", seq=8192, grad_ckpt=True)
    fused, causal = estimate(qwen, setup), estimate(qwen, setup.replace(loss="causal-lm"))
    fwd = fused.phases[Phase.FORWARD][Category.LOGITS]
    assert fwd < 4 * 8192 * qwen.vocab_size / 10  # under a tenth of the fp32 logits
    assert fwd >= TRL_TOKEN_CHUNK * TRL_VOCAB_CHUNK * 2  # the bf16 buffer
    assert fused.allocated_bytes < causal.allocated_bytes


@pytest.mark.parametrize("rows,vocab,hidden", [(300, 20000, 64), (511, 49152, 32), (200, 70000, 32)])
@pytest.mark.parametrize("trains", [True, False])
def test_the_fused_head_bytes_equal_trls_function_on_cpu(rows, vocab, hidden, trains):
    """ChunkedLogProbFunction alone under the tracker (fp32, cpu: the torch fold): its peak in
    forward and in backward beyond its inputs, to the byte but the tracker's few KiB of small
    tensors (the per-token vectors, aranges, the labels)."""
    _trl()
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from profiler.measure.tracker import StorageTracker
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=trains)
    targets = torch.randint(0, vocab, (rows,))
    tracker = StorageTracker()
    with tracker:
        inputs = tracker.current_bytes
        tracker.track([h, w], Category.WEIGHTS)
        inputs = tracker.current_bytes
        with tracker.phase("forward") as f:
            out = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0,
                                               ("log_probs", "entropy", "is_top1"))
        loss = -out[0].sum()
        with tracker.phase("backward") as b:
            loss.backward()
    want = fused_head_bytes(rows, vocab, hidden, 4, head_trains=trains, triton=False, copies_rows=False)
    small = 64 * rows + 16 * min(vocab, TRL_VOCAB_CHUNK) + 2**16  # per-token vectors, aranges
    got_f, got_b = f.peak_bytes - inputs, b.peak_bytes - b.start_bytes
    assert 0 <= got_f - want["forward"] <= small, (got_f, want["forward"])
    assert 0 <= got_b - want["backward"] <= small + 2 * 4 * rows, (got_b, want["backward"])


# --- the real SFTTrainer on CPU steps ------------------------------------------------------

def _tensors(phase: dict) -> int:
    return sum(v for k, v in phase.items() if Category(k) in TENSOR_CATEGORIES)


def _reduced(tmp_path, name: str, layers: int) -> str:
    """A shipped config at ``layers`` of its layers: real width and vocabulary, fewer layers."""
    from estimator.modelspec import MODELS_DIR
    raw = json.loads((MODELS_DIR / f"{name}.json").read_text())
    raw["num_hidden_layers"] = layers
    path = tmp_path / f"{name}-{layers}l.json"
    path.write_text(json.dumps(raw))
    return str(path)


#: SmolLM2-135M (49,152 vocabulary, tied) with LoRA, and Qwen3-0.6B's width and 151,936
#: vocabulary at 4 of its 28 layers (216M parameters) fully fine-tuned: fp32, seq 512,
#: SFTConfig's gradient checkpointing (trl >= 0.22's default)
SFT_CASES = [("smollm2-135m", "lora", None), ("qwen3-0.6b", "full", 4)]


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,layers", SFT_CASES, ids=lambda x: str(x))
def test_the_real_sft_trainer_steps_equal_the_estimate_per_phase(tmp_path, name, mode, layers):
    _trl()
    from profiler.measure.run import run_case
    model = _reduced(tmp_path, name, layers) if layers else name
    setup = Setup(trainer="sft", loss="chunked-nll", mode=mode, precision="fp32", batch=1, seq=512, grad_ckpt=True,
                  device="cpu")
    record = run_case(model, setup, "cpu", steps=1)
    assert record.ok, record.message
    assert record.predicted.params >= 100_000_000
    for measured, first in ((record.measured.phases, False), (record.measured.first_step, True)):
        assert set(measured) == {"forward", "backward", "optimizer", "zero_grad"}
        for phase, m in measured.items():
            if phase == Phase.ZERO_GRAD.value:
                continue
            want = _tensors(record.predicted.phases_of(first)[phase])
            got = m.peak_allocated_bytes
            assert abs(want - got) <= SFT_TOLERANCE * got, (first, phase, want, got)


@pytest.mark.slow
def test_the_trainer_callback_reads_an_sft_trainer_and_its_peaks_match(tmp_path):
    """VramCallback on a real SFTTrainer (a small Llama: the fused head's [N x 32768] tile buffer
    is most of the step): the setup says sft / chunked-nll, every step within SFT_TOLERANCE."""
    trl = _trl()
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from profiler.integrations.trainer_callback import VramCallback
    from profiler.measure.trl_steps import _tokenizer
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    ids = torch.randint(2, 256, (8, 64)).tolist()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False,
                         max_length=64)
    with VramCallback(out=tmp_path / "steps.jsonl") as cb:
        trl.SFTTrainer(model=LlamaForCausalLM(config), args=args, processing_class=_tokenizer(),
                       train_dataset=datasets.Dataset.from_dict({"input_ids": ids}), callbacks=[cb]).train()
    s = cb.setup
    assert (s.trainer, s.loss, s.grad_ckpt, s.batch, s.seq) == (Trainer.SFT, Loss.CHUNKED_NLL, True, 2, 64)
    p = cb.predicted
    for r in cb.records:
        want = p.first_step["allocated_bytes"] if r.first_step and p.first_step else p.allocated_bytes
        got = r.measured.peak_allocated_bytes
        assert abs(want - got) <= SFT_TOLERANCE * got, (r.step, got, want)
