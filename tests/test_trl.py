"""TRL's trainers (issue 24): the optional extra, ``--trainer sft``'s defaults per trl version,
the fused LM head's bytes (``--loss chunked-nll``) and the real ``SFTTrainer`` on CPU steps;
``--trainer dpo`` (``--ref-model``) and the real ``DPOTrainer`` on CPU steps; ``--trainer grpo``
(``--num-generations``, ``--max-completion``) and the real ``GRPOTrainer`` on CPU steps.

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
    (["--trainer", "ppo"], "unknown trainer 'ppo'"),
    (["--ref-model", "separate"], "--trainer hf has none"),
    (["--trainer", "sft", "--ref-model", "separate"], "--trainer sft has none"),
    (["--trainer", "dpo", "--ref-model", "adapter"], "--mode full trains none"),
    (["--trainer", "dpo", "--ref-model", "frozen"], "unknown refmodel 'frozen'"),
    (["--trainer", "dpo", "--mode", "eval"], "--trainer dpo trains"),
    (["--trainer", "dpo", "--loss", "causal-lm"], "fused LM head"),
    (["--trainer", "dpo", "--loop", "manual"], "leave --loop trainer"),
    (["--trainer", "dpo", "--sharding", "zero3", "--world-size", "2"], "not modelled yet"),
    (["--trainer", "dpo", "--versions", "trl=1.15"], "trl 1.15's was not read"),
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
    path.write_text('[[cases]]\nmodel = "gpt2"\ntrainer = "dpo"\nmode = "lora"\nlora_targets = "c_attn"\n')
    (_, setup, _), = load_matrix(path)
    assert (setup.trainer, setup.loss, setup.grad_ckpt, setup.ref_model.value) == \
        (Trainer.DPO, Loss.CHUNKED_NLL, True, "adapter")


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


def _assert_every_phase_within(record, phases: set[str]) -> None:
    """Every phase of the steady step and of the first, but zero_grad, within the issue's bound
    of the real trainer's CPU step."""
    assert record.ok, record.message
    for measured, first in ((record.measured.phases, False), (record.measured.first_step, True)):
        assert set(measured) == phases
        for phase, m in measured.items():
            if phase == Phase.ZERO_GRAD.value:
                continue
            want = _tensors(record.predicted.phases_of(first)[phase])
            got = m.peak_allocated_bytes
            assert abs(want - got) <= SFT_TOLERANCE * got, (first, phase, want, got)


def _reduced(tmp_path, name: str, layers: int) -> str:
    """A shipped config at ``layers`` of its layers: real width and vocabulary, fewer layers."""
    from estimator.modelspec import MODELS_DIR
    raw = json.loads((MODELS_DIR / f"{name}.json").read_text())
    raw["n_layer" if "n_layer" in raw else "num_hidden_layers"] = layers  # GPT-2 names it n_layer
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
    _assert_every_phase_within(record, {"forward", "backward", "optimizer", "zero_grad"})
    assert record.predicted.params >= 100_000_000


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


# --- --trainer dpo: TRL's DPOTrainer ---------------------------------------------------------

def test_dpo_defaults_and_the_reference_trl_picks_by_mode():
    from estimator.setup import RefModel
    assert trainer_defaults("dpo", (("trl", "1.16"),)) == {"loss": Loss.CHUNKED_NLL, "grad_ckpt": True}
    full = Setup(trainer="dpo", loss="chunked-nll", mode="full")
    lora = Setup(trainer="dpo", loss="chunked-nll", mode="lora")
    assert (full.ref_model, lora.ref_model) == (RefModel.SEPARATE, RefModel.ADAPTER)  # dpo_trainer.py:907-915
    assert full.to_dict()["ref_model"] == "separate" and "ref_model" not in Setup().to_dict()


def test_the_dpo_flags_take_the_defaults(cli):
    out = cli("estimate", "smollm2-135m", "--trainer", "dpo", "--mode", "lora", "--json")
    assert out.code == 0, out.err
    setup = json.loads(out.out)["setup"]
    assert (setup["trainer"], setup["loss"], setup["grad_ckpt"], setup["ref_model"]) == \
        ("dpo", "chunked-nll", True, "adapter")


def test_dpo_with_precomputed_log_probs_is_the_sft_step_at_twice_the_batch():
    """No reference forward, no reference copy: chosen + rejected in one policy batch of 2b
    (dpo_trainer.py:169, :1299), the fused head as SFT's; the same bytes, phase by phase."""
    spec = load_model("smollm2-135m")
    for mode, b in (("full", 1), ("lora", 3)):
        dpo = Setup(trainer="dpo", loss="chunked-nll", ref_model="precomputed", mode=mode, batch=b, seq=512,
                    grad_ckpt=True, device="cpu")
        sft = Setup(trainer="sft", loss="chunked-nll", mode=mode, batch=2 * b, seq=512, grad_ckpt=True, device="cpu")
        ed, es = estimate(spec, dpo), estimate(spec, sft)
        assert Phase.REFERENCE not in ed.tensor_phases
        assert ed.tensor_phases == es.tensor_phases


def test_the_separate_reference_adds_a_frozen_copy_and_the_reference_forward():
    spec = load_model("qwen3-0.6b")
    base = dict(trainer="dpo", loss="chunked-nll", mode="lora", batch=2, seq=1024, grad_ckpt=True, device="cpu")
    sep, ada, pre = (estimate(spec, Setup(ref_model=r, **base)) for r in ("separate", "adapter", "precomputed"))
    copy = sep.phases[Phase.BACKWARD][Category.WEIGHTS] - ada.phases[Phase.BACKWARD][Category.WEIGHTS]
    assert copy == count_params_total(spec) * 2  # the base model again, bf16
    for phase in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER):
        assert ada.tensor_phases[phase] == pre.tensor_phases[phase]
    ref = ada.tensor_phases[Phase.REFERENCE]
    fwd = ada.tensor_phases[Phase.FORWARD]
    # after the policy's forward: everything it saved is alive beside the reference's working set
    assert ref[Category.ACTIVATIONS] > fwd[Category.ACTIVATIONS] and ref[Category.WEIGHTS] == fwd[Category.WEIGHTS]


def count_params_total(spec) -> int:
    from estimator.params import count_params
    return count_params(spec).total


@pytest.mark.parametrize("rows,vocab,hidden", [(300, 20000, 64), (511, 49152, 32)])
def test_the_reference_heads_log_probs_only_fold_is_12_bytes_a_tile_element(rows, vocab, hidden):
    """The separate reference's fused head asks log_probs only (dpo_trainer.py:962, utils.py:1552):
    under no_grad, ChunkedLogProbFunction's forward peak beyond its inputs is the buffer, the
    statistics and 12 bytes per tile element (estimator/dpo.py), to the byte but the small vectors."""
    _trl()
    import torch
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from estimator.dpo import TRL_FORWARD_TILE_BYTES_LOGPROBS
    from profiler.measure.tracker import StorageTracker
    torch.manual_seed(0)
    h, w = torch.randn(rows, hidden), torch.randn(vocab, hidden)
    targets = torch.randint(0, vocab, (rows,))
    tracker = StorageTracker()
    with tracker:
        tracker.track([h, w], Category.WEIGHTS)
        with torch.no_grad(), tracker.phase("forward") as f:
            ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",))
    want = fused_head_bytes(rows, vocab, hidden, 4, head_trains=False, triton=False, copies_rows=False,
                            forward_tile_bytes=TRL_FORWARD_TILE_BYTES_LOGPROBS)["forward"]
    small = 64 * rows + 16 * min(vocab, TRL_VOCAB_CHUNK) + 2**16
    got = f.peak_bytes - f.start_bytes
    assert 0 <= got - want <= small, (got, want)


def test_a_trl_trainer_on_ranks_is_refused_in_one_sentence(cli):
    out = cli("profile", "gpt2", "--trainer", "dpo", "--backend", "sim", "--nproc", "2", "--steps", "1")
    assert out.code == 2 and "--nproc does not run TRL's trainers" in out.err and out.err.count("\n") == 1, out.err


#: The real trainers under the CUDA-semantics sim (fake tensors, Triton's launches allocating nothing,
#: profiler/measure/sim.py trl_fused_head_on_cuda), at a few layers of the real widths and
#: vocabularies, bf16, b2 x s1024 (DPO: b1, its concatenated forward 2 x 1024), checkpointing
#: (TRL's default; GRPO: 512-token prompts, 2 generations of 256 tokens): the estimate's CUDA path (the
#: compact rows, the tile buffer, no torch fold) against TRL's own code. Measured within 0.62 % per
#: phase (GRPO LoRA's generate phase; the rest within 0.15 %).
SIM_CASES = [
    ("smollm2-135m", 8, dict(trainer="sft", mode="lora")),
    ("qwen3-0.6b", 4, dict(trainer="sft", mode="full")),
    ("smollm2-135m", 8, dict(trainer="sft", mode="lora", completion_only=256)),
    ("smollm2-135m", 8, dict(trainer="sft", mode="lora", packing="packed")),
    ("smollm2-135m", 8, dict(trainer="sft", mode="lora", packing="padding-free")),
    ("smollm2-135m", 8, dict(trainer="dpo", mode="lora", batch=1)),
    ("smollm2-135m", 8, dict(trainer="dpo", mode="lora", batch=1, completion_only=256)),
    ("gpt2", 12, dict(trainer="sft", mode="lora", lora_targets=["c_attn"])),
    # full fine-tuning of tied heads at a 49k-50k vocabulary, where the chunked loss makes a layer's
    # backward or the loss's the peak: GPT-2 bf16 (-1.42 %, first step -2.37 %, while the end's count of
    # large tensors chose the moment) and SmolLM2 fp32 (sdpa's math kernel; -2.55 %, first step -4.03 %,
    # before the head's waiting gradient and the math kernel's moment in the first layer's backward)
    ("gpt2", 12, dict(trainer="sft", mode="full")),
    ("smollm2-135m", 8, dict(trainer="sft", mode="full", precision="fp32")),
    ("smollm2-135m", 8, dict(trainer="grpo", mode="lora", seq=512, num_generations=2, max_completion=256,
                             grad_ckpt=False)),
    ("qwen3-0.6b", 4, dict(trainer="grpo", mode="full", seq=512, num_generations=2, max_completion=256,
                           grad_ckpt=False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,layers,over", SIM_CASES, ids=lambda x: str(x))
def test_the_real_trl_trainers_under_the_cuda_sim_equal_the_estimate_per_phase(tmp_path, name, layers, over):
    _trl()
    from profiler.measure.run import run_case
    setup = Setup(**dict(dict(loss="chunked-nll", precision="bf16", batch=2, seq=1024, grad_ckpt=True), **over))
    record = run_case(_reduced(tmp_path, name, layers), setup, "sim", steps=1)
    phases = {"forward", "backward", "optimizer", "zero_grad"} | {"dpo": {"reference"}, "grpo": {"generate"}}.get(
        over["trainer"], set())
    _assert_every_phase_within(record, phases)


#: Real DPOTrainer steps, fp32, seq 512, checkpointing (DPOConfig's default), one per reference, at
#: a few layers of the real width and vocabulary (each under ~30 s on two shared cores; the full-size
#: steps are results/trl/dpo-cpu.jsonl): SmolLM2-135M at 4 of its 30 layers with LoRA and the adapter
#: disabled as reference; GPT-2 at 2 of its 12 full with a separate copy and with precomputed log-probs
DPO_CASES = [("smollm2-135m", "lora", "adapter", 4, "q_proj,v_proj"), ("gpt2", "full", "separate", 2, None),
             ("gpt2", "full", "precomputed", 2, None)]


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,ref,layers,targets", DPO_CASES, ids=lambda x: str(x))
def test_the_real_dpo_trainer_steps_equal_the_estimate_per_phase(tmp_path, name, mode, ref, layers, targets):
    _trl()
    from profiler.measure.run import run_case
    model = _reduced(tmp_path, name, layers) if layers else name
    kw = dict(lora_targets=targets) if targets else {}
    setup = Setup(trainer="dpo", loss="chunked-nll", ref_model=ref, mode=mode, precision="fp32", batch=1, seq=512,
                  grad_ckpt=True, device="cpu", **kw)
    record = run_case(model, setup, "cpu", steps=1)
    _assert_every_phase_within(record, {"forward", "backward", "optimizer", "zero_grad"}
                               | ({"reference"} if ref != "precomputed" else set()))


@pytest.mark.slow
def test_the_trainer_callback_reads_a_dpo_trainer_and_its_peaks_match(tmp_path):
    """VramCallback on a real DPOTrainer with LoRA from a peft_config (a small Llama): the setup
    says dpo / chunked-nll / the adapter as reference, every step within SFT_TOLERANCE."""
    trl = _trl()
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from estimator.setup import RefModel
    from profiler.integrations.trainer_callback import VramCallback
    from profiler.measure.dpo_steps import _tokenizer, preference_rows
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1100, max_position_embeddings=128)
    torch.manual_seed(0)
    data = datasets.Dataset.from_dict(preference_rows(torch.randint(0, 1000, (8, 64)), 8))
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False,
                         max_length=64)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    with VramCallback(out=tmp_path / "steps.jsonl") as cb:
        trl.DPOTrainer(model=LlamaForCausalLM(config), args=args, processing_class=_tokenizer(), train_dataset=data,
                       peft_config=lora, callbacks=[cb]).train()
    s = cb.setup
    assert (s.trainer, s.loss, s.ref_model, s.grad_ckpt, s.batch, s.seq) == \
        (Trainer.DPO, Loss.CHUNKED_NLL, RefModel.ADAPTER, True, 2, 64)
    p = cb.predicted
    for r in cb.records:
        want = p.first_step["allocated_bytes"] if r.first_step and p.first_step else p.allocated_bytes
        got = r.measured.peak_allocated_bytes
        assert abs(want - got) <= SFT_TOLERANCE * got, (r.step, got, want)


#: The committed real-step records (results/trl/, measured) beside today's estimate: the fused head's
#: frozen input, TRL's peft input leaf and DPO's disabled dropout bring every phase within this
RECORD_TOLERANCE = 0.001


@pytest.mark.parametrize("name", ["sft-cpu.jsonl", "dpo-cpu.jsonl"])
def test_the_committed_trl_records_equal_todays_estimate_per_phase(name):
    from pathlib import Path

    from profiler.record import read_records
    root = Path(__file__).resolve().parents[1] / "results" / "trl"
    records = read_records(root / name)
    assert len(records) >= 5
    for r in records:
        model = r.case.model if not r.case.model.endswith(".json") else str(root / Path(r.case.model).name)
        spec, setup = load_model(model), Setup.from_dict(r.case.setup)
        est = estimate(spec, setup)
        for first, measured in ((False, r.measured.phases), (True, r.measured.first_step)):
            phases = (est.first_step_tensor_phases if first else None) or est.tensor_phases
            for phase, m in measured.items():
                if phase == Phase.ZERO_GRAD.value:
                    continue
                want = _tensors({c.value: v for c, v in phases[Phase(phase)].items()})
                got = m.peak_allocated_bytes
                assert abs(want - got) <= RECORD_TOLERANCE * got, (r.case.model, setup.mode, first, phase, want, got)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["padded", "packed", "padding-free"])
def test_sft_packing_on_real_steps_equals_the_estimate_per_phase(tmp_path, packing):
    """--packing (TRL 1.16 SFTTrainer on variable-length examples): padded rows, bfd-packed
    bins joined into one row with restarting position_ids, padding-free one row of the batch;
    SmolLM2-135M at 4 layers, LoRA, batch 2 x seq 512 (measured within 0.22 % per phase)."""
    _trl()
    from profiler.measure.run import run_case
    setup = Setup(trainer="sft", loss="chunked-nll", mode="lora", precision="fp32", batch=2, seq=512, grad_ckpt=True,
                  device="cpu", packing=packing)
    record = run_case(_reduced(tmp_path, "smollm2-135m", 4), setup, "cpu", steps=1)
    assert record.ok, record.message
    for phase, m in record.measured.phases.items():
        if phase == Phase.ZERO_GRAD.value:
            continue
        want, got = _tensors(record.predicted.phases[phase]), m.peak_allocated_bytes
        assert abs(want - got) <= SFT_TOLERANCE * got, (phase, want, got)


def test_packing_is_an_sft_knob():
    with pytest.raises(ValueError, match="packing"):
        Setup(packing="packed")


# --- GRPO -----------------------------------------------------------------------------------

def test_grpo_takes_grpo_configs_defaults_and_its_knobs(cli):
    out = cli("estimate", "smollm2-135m", "--trainer", "grpo", "--batch", "8", "--json")
    assert out.code == 0, out.err
    data = json.loads(out.out)
    setup = data["setup"]
    assert (setup["trainer"], setup["loss"], setup["grad_ckpt"]) == ("grpo", "chunked-nll", True)
    # grpo_config.py:480-497, :689-692
    assert (setup["num_generations"], setup["max_completion"], setup["num_iterations"]) == (8, 512, 1)
    assert list(data["phases"])[:2] == ["generate", "forward"]  # num_iterations 1: no log-prob pass
    assert "num_generations" not in Setup().to_dict()  # records keep their case keys


@pytest.mark.parametrize("argv,match", [
    (["--num-generations", "4"], "--trainer hf generates nothing"),
    (["--trainer", "sft", "--max-completion", "64"], "--trainer sft generates nothing"),
    (["--trainer", "grpo", "--batch", "4", "--num-generations", "3"], "must be divisible by --num-generations 3"),
    (["--trainer", "grpo", "--batch", "2", "--num-generations", "1"], "at least 2 completions"),
    (["--trainer", "grpo", "--batch", "8", "--mode", "inference"], "--trainer grpo trains"),
    (["--trainer", "grpo", "--batch", "8", "--mode", "qlora", "--quant", "nf4"], "not modelled yet"),
    (["--trainer", "grpo", "--batch", "8", "--loss", "causal-lm"], "fused LM head"),
    (["--trainer", "grpo", "--batch", "8", "--versions", "trl=1.15"], "trl 1.15's was not read"),
    (["--trainer", "grpo", "--batch", "8", "--max-completion", "x"], "must be an integer"),
    (["--num-iterations", "2"], "--trainer hf generates nothing"),
    (["--trainer", "grpo", "--batch", "8", "--num-iterations", "0"], "must be a positive integer"),
    (["--trainer", "grpo", "--batch", "8", "--beta", "-1"], "--beta must be a finite number >= 0"),
    (["--trainer", "grpo", "--batch", "8", "--beta", "nan"], "--beta must be a finite number >= 0"),
    (["--trainer", "grpo", "--batch", "8", "--beta", "x"], "--beta must be a number"),
    (["--trainer", "sft", "--beta", "0.1"], "--beta is GRPO's KL coefficient"),
])
def test_bad_grpo_flags_are_one_sentence_and_exit_2(cli, argv, match):
    out = cli("estimate", "smollm2-135m", *argv)
    assert out.code == 2 and match in out.err and out.err.count("\n") == 1, out.err


def test_the_generation_batch_counts_every_micro_batch_and_rank():
    # steps_per_generation = gradient_accumulation_steps (grpo_config.py:1098-1100): one generation
    # of batch x grad_accum completions per rank; 2 x 1 x 2 = 4 holds two groups of 2
    Setup(trainer="grpo", loss="chunked-nll", batch=2, grad_accum=2, num_generations=4)
    with pytest.raises(ValueError, match="= 2 completions"):
        Setup(trainer="grpo", loss="chunked-nll", batch=2, num_generations=4)


def test_grpo_is_generation_then_the_sft_step_at_prompt_plus_completion():
    spec = load_model("smollm2-135m")
    kw = dict(loss="chunked-nll", mode="lora", batch=4, grad_ckpt=True, device="cpu", precision="fp32")
    grpo = estimate(spec, Setup(trainer="grpo", seq=128, num_generations=2, max_completion=384, grad_accum=2, **kw))
    sft = estimate(spec, Setup(trainer="sft", seq=512, grad_accum=2, **kw))
    for phase in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER):
        # the one difference: GRPO's head asks no is_top1, one byte less a tile element (logits.py)
        tile = min(4 * 511, TRL_TOKEN_CHUNK) * min(spec.vocab_size, TRL_VOCAB_CHUNK)
        assert _tensors(sft.tensor_phases[phase]) - _tensors(grpo.tensor_phases[phase]) == \
            (tile if phase is Phase.FORWARD else 0), phase
    # generation: batch x grad_accum completions, prompt prefilled and max_completion decoded, beside
    # the weights and, after the first step, the optimizer's state; no gradients (zero_grad freed them)
    gen = estimate(spec, Setup(mode="inference", batch=8, seq=128, new_tokens=384, device="cpu", precision="fp32"))
    worst = max(gen.tensor_phases.values(), key=_tensors)
    steady, first = grpo.tensor_phases[Phase.GENERATE], grpo.first_step_tensor_phases[Phase.GENERATE]
    states = grpo.tensor_phases[Phase.OPTIMIZER][Category.OPTIMIZER_STATE]
    adapter = steady[Category.WEIGHTS] - worst[Category.WEIGHTS]
    assert 0 < adapter < 0.01 * worst[Category.WEIGHTS]  # the LoRA weights
    assert _tensors(steady) == _tensors(worst) + adapter + states and states > 0
    assert _tensors(first) == _tensors(worst) + adapter
    assert steady[Category.GRADIENTS] == 0


def test_more_than_one_iteration_adds_the_no_grad_log_prob_pass():
    spec = load_model("smollm2-135m")
    kw = dict(trainer="grpo", loss="chunked-nll", mode="lora", batch=2, seq=256, grad_ckpt=True, device="cpu",
              precision="fp32", num_generations=2, max_completion=256)
    one, two = estimate(spec, Setup(**kw)), estimate(spec, Setup(num_iterations=2, **kw))
    assert Phase.LOGPROB not in one.tensor_phases
    for phase in (Phase.GENERATE, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER):
        assert two.tensor_phases[phase] == one.tensor_phases[phase]
    gen, logprob = two.tensor_phases[Phase.GENERATE], two.tensor_phases[Phase.LOGPROB]
    # beside the same model states, a no-grad forward at batch x (prompt + completion): its fused head
    # (no gradient accumulators) is the whole of the logits, the forward's saved activations are not there
    assert logprob[Category.WEIGHTS] == gen[Category.WEIGHTS] and logprob[Category.KV_CACHE] == 0
    N, h = 2 * 511, spec.hidden_size
    head = fused_head_bytes(rows=N, vocab=spec.vocab_size, hidden=h, compute_bytes=4, head_trains=False,
                            triton=False, copies_rows=True, forward_tile_bytes=12)["forward"]
    assert logprob[Category.LOGITS] == head and logprob[Category.ACTIVATIONS] == 4 * 2 * 512 * h


def test_beta_adds_the_reference_pass_and_under_full_fine_tuning_its_weights():
    """--beta not 0 (GRPOConfig.beta, default 0.0: left out of the record's setup): the reference's
    no-grad log-prob pass, the logprob phase of num_iterations 2 again; its weights only under full
    fine-tuning (a frozen copy in the policy's dtype), none with LoRA (the adapter disabled)."""
    spec = load_model("smollm2-135m")
    kw = dict(trainer="grpo", loss="chunked-nll", batch=2, seq=256, grad_ckpt=True, device="cpu", precision="fp32",
              num_generations=2, max_completion=256)
    assert "beta" not in Setup(beta=0, **kw).to_dict() and Setup(beta=0.04, **kw).to_dict()["beta"] == 0.04
    for mode, extra in (("lora", dict(lora_targets=("q_proj", "v_proj"))), ("full", {})):
        zero = estimate(spec, Setup(mode=mode, **kw, **extra))
        beta = estimate(spec, Setup(mode=mode, beta=0.04, **kw, **extra))
        two = estimate(spec, Setup(mode=mode, num_iterations=2, **kw, **extra))
        copy = count_params_total(spec) * 4 if mode == "full" else 0
        assert set(beta.tensor_phases) == set(two.tensor_phases) == set(zero.tensor_phases) | {Phase.LOGPROB}
        for phase, comp in beta.tensor_phases.items():
            assert comp[Category.WEIGHTS] == two.tensor_phases[phase][Category.WEIGHTS] + copy, (mode, phase)
            assert _tensors(comp) == _tensors(two.tensor_phases[phase]) + copy, (mode, phase)


#: SmolLM2-135M's widths (49,152 vocabulary, tied) at 4 of its 30 layers, LoRA on q and v and full:
#: 2 completions of one prompt, 256 prompt + 256 completion tokens, fp32, checkpointing on; with
#: num_iterations 2 the log-prob pass runs, and generation every second step (3 steps: two of them)
GRPO_CASES = [("smollm2-135m", "lora", 4, "q_proj,v_proj", 1, None), ("smollm2-135m", "full", 4, None, 1, None),
              ("smollm2-135m", "lora", 4, "q_proj,v_proj", 2, None),
              # --beta: the reference's no-grad pass, the adapter disabled (LoRA) or a frozen copy (full)
              ("smollm2-135m", "lora", 4, "q_proj,v_proj", 1, 0.04), ("smollm2-135m", "full", 4, None, 1, 0.04)]


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,layers,targets,iterations,beta", GRPO_CASES, ids=lambda x: str(x))
def test_the_real_grpo_trainer_steps_equal_the_estimate_per_phase(tmp_path, name, mode, layers, targets, iterations,
                                                                  beta):
    _trl()
    from profiler.measure.run import run_case
    model = _reduced(tmp_path, name, layers)
    kw = dict(lora_targets=targets) if targets else {}
    setup = Setup(trainer="grpo", loss="chunked-nll", mode=mode, precision="fp32", batch=2, seq=256,
                  num_generations=2, max_completion=256, num_iterations=iterations, grad_ckpt=True, device="cpu",
                  beta=beta, **kw)
    record = run_case(model, setup, "cpu", steps=iterations)
    _assert_every_phase_within(record, {"generate", "forward", "backward", "optimizer", "zero_grad"}
                               | ({"logprob"} if iterations > 1 or beta else set()))


# --- --completion-only: SFT's loss on the completion alone -----------------------------------

def test_completion_only_shrinks_the_fused_head_on_cuda_only():
    """Triton's compact path scores the labelled rows only (utils.py:1642-1645): batch x completion
    rows on CUDA; the torch fold on the cpu device scores every position whatever the labels."""
    spec = load_model("smollm2-135m")
    kw = dict(trainer="sft", loss="chunked-nll", mode="lora", batch=4, seq=2048, grad_ckpt=True)
    from estimator.logits import chunked_nll_bytes
    for device in ("cuda", "cpu"):
        every, some = (chunked_nll_bytes(spec, Setup(device=device, completion_only=c, **kw)) for c in (None, 256))
        if device == "cpu":
            assert some == every
            continue
        h, N, M, p = spec.hidden_size, 4 * 2047, 4 * 256, Setup(**kw).precision.compute_bytes
        # the gathered rows' copy and the statistics scale with the rows scored,
        # and the tile buffer holds min(rows, 4096) of them
        tiles = (min(N, TRL_TOKEN_CHUNK) - min(M, TRL_TOKEN_CHUNK)) * TRL_VOCAB_CHUNK * p
        assert every["forward"] - some["forward"] == (p * h + 7 * 4) * (N - M) + tiles
        assert some["backward"] < every["backward"]
    assert "completion_only" not in Setup(**kw).to_dict() and Setup(completion_only=5, **kw).to_dict()[
        "completion_only"] == 5


@pytest.mark.parametrize("argv, match", [
    (["--completion-only", "16"], "--completion-only is SFTTrainer's completion_only_loss"),
    (["--trainer", "sft", "--seq", "64", "--completion-only", "64"], "1 to --seq - 1 = 63"),
    (["--trainer", "sft", "--completion-only", "0"], "1 to --seq - 1"),
    (["--trainer", "sft", "--completion-only", "8", "--packing", "packed"], "with --packing packed is not modelled"),
])
def test_bad_completion_only_is_one_sentence_and_exit_2(cli, argv, match):
    out = cli("estimate", "smollm2-135m", *argv)
    assert out.code == 2 and match in out.err and len(out.err.strip().splitlines()) == 1, out.err


@pytest.mark.slow
def test_the_real_sft_trainer_with_completion_only_loss_equals_the_estimate(tmp_path):
    """SFTConfig(completion_only_loss=True) on a prompt-completion dataset (the last 64 of 512 tokens
    labelled), SmolLM2-135M at 4 layers, LoRA q/v, b2, fp32, checkpointing: every phase within
    SFT_TOLERANCE, and on the cpu device the same bytes as every token labelled (the torch fold
    scores every position)."""
    _trl()
    from profiler.measure.run import run_case
    model = _reduced(tmp_path, "smollm2-135m", 4)
    kw = dict(trainer="sft", loss="chunked-nll", mode="lora", lora_targets="q_proj,v_proj", precision="fp32",
              batch=2, seq=512, grad_ckpt=True, device="cpu")
    masked = run_case(model, Setup(completion_only=64, **kw), "cpu", steps=1)
    _assert_every_phase_within(masked, {"forward", "backward", "optimizer", "zero_grad"})
    every = run_case(model, Setup(**kw), "cpu", steps=1)
    assert {k: m.peak_allocated_bytes for k, m in masked.measured.phases.items()} == \
        {k: m.peak_allocated_bytes for k, m in every.measured.phases.items()}


# --- QLoRA under TRL: the adapters cast to bf16 ----------------------------------------------

def test_trl_casts_a_quantized_models_adapters_to_bf16():
    """trl 1.16 SFTTrainer / DPOTrainer / GRPOTrainer: a 4-bit model's adapters go bf16
    (sft_trainer.py:902-911), so the adapters, their gradients and AdamW's two states are half
    of peft's fp32; the HF Trainer keeps peft's fp32."""
    spec = load_model("smollm2-135m")
    kw = dict(mode="qlora", quant="nf4", lora_targets=("all-linear",), precision="bf16", batch=2, seq=512,
              grad_ckpt=True, device="cpu")
    from estimator.estimate import model_states
    from estimator.params import lora_params
    hf, sft = model_states(spec, Setup(**kw)), model_states(spec, Setup(trainer="sft", loss="chunked-nll", **kw))
    n = lora_params(spec, ("all-linear",), 16)
    assert (Setup(**kw).adapter_bytes, Setup(trainer="sft", loss="chunked-nll", **kw).adapter_bytes) == (4, 2)
    assert hf.weights - sft.weights == 2 * n and hf.gradients - sft.gradients == 2 * n
    assert hf.optimizer_state - sft.optimizer_state == 2 * 2 * n
    assert Setup(trainer="sft", loss="chunked-nll", **dict(kw, mode="lora", quant="none")).adapter_bytes == 4


#: (trainer, targets, batch, k-bit preparation): peft's (an fp32 stream: each adapter copies its input to
#: bf16) and none (TRL 1.x prepares nothing: bf16 adapters read the bf16 stream as it is)
QLORA_TRL_CASES = [("sft", "all-linear", 2, "auto"), ("sft", "all-linear", 2, "none"),
                   ("dpo", "q_proj,v_proj", 1, "auto")]


@pytest.mark.slow
@pytest.mark.parametrize("trainer,targets,batch,prep", QLORA_TRL_CASES, ids=lambda x: str(x))
def test_the_real_trl_trainers_on_a_qlora_model_equal_the_estimate(tmp_path, trainer, targets, batch, prep):
    """SFTTrainer and DPOTrainer on an nf4 model (peft's k-bit preparation, bf16 compute), SmolLM2-135M
    at 4 layers, seq 512: every phase within SFT_TOLERANCE (peft's fp32 adapters assumed instead:
    all-linear's optimizer phase +4.1 %, results/trl/qlora-trl-cpu.jsonl)."""
    _trl()
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install -e '.[quant]')")
    from profiler.measure.run import run_case
    setup = Setup(trainer=trainer, loss="chunked-nll", mode="qlora", quant="nf4", lora_targets=targets,
                  precision="bf16", batch=batch, seq=512, grad_ckpt=True, device="cpu", kbit_prep=prep)
    record = run_case(_reduced(tmp_path, "smollm2-135m", 4), setup, "cpu", steps=1)
    _assert_every_phase_within(record, {"forward", "backward", "optimizer", "zero_grad"}
                               | ({"reference"} if trainer == "dpo" else set()))
