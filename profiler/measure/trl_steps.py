"""The real TRL ``SFTTrainer`` driving the measured steps (``--trainer sft``).

The model the harness built (random weights, LoRA applied by peft, checkpointing on) goes
to ``trl.SFTTrainer`` with a tiny in-memory ``datasets.Dataset`` of the setup's synthetic
token ids (already tokenized: nothing downloaded, no chat template) and a tokenizer built in
code that knows only its pad and eos tokens. ``trainer.train()`` runs ``1 + steps`` optimizer
steps; the phases are cut where the Trainer's own loop passes
(transformers 5.24 trainer.py:1902-1957, ``training_step`` :2051-2126):

- forward: ``SFTTrainer.compute_loss`` (its fused LM head, trl 1.16.0 sft_trainer.py:1560);
- backward: ``accelerator.backward(loss)``;
- optimizer: ``on_pre_optimizer_step`` .. ``on_optimizer_step`` (``optimizer.step()``);
- zero_grad: ``on_optimizer_step`` .. ``on_step_end`` (the scheduler and ``model.zero_grad()``).

Gradient clipping (``max_grad_norm=1.0``, between backward and ``on_pre_optimizer_step``)
falls between two phases and is in neither. The optimizer is the harness's own
(``optimizers=(opt, None)``), so its implementation is the setup's.
"""
from __future__ import annotations

import contextlib
import tempfile
import time

from estimator.categories import Category, Phase
from estimator.setup import Loss, Mode, Packing, Precision, Setup
from estimator.versions import installed_versions, parse_version
from profiler.measure.build import SetupUnavailable, build_optimizer, synthetic_batch
from profiler.measure.sim import driven_on_the_sim, real_batches


def _require_trl(setup: Setup):
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError:
        raise SetupUnavailable("--trainer sft runs TRL's SFTTrainer, and trl is not installed: "
                               "pip install -e '.[trl]' (every other setup still runs)") from None
    have = installed_versions().get("trl", trl.__version__)
    if setup.loss is Loss.CAUSAL_LM and parse_version(have) >= (1, 7, 0):
        # trl >= 1.7 runs the fused LM head for every "nll" loss (sft_trainer.py:1611)
        raise SetupUnavailable(f"--trainer sft --loss causal-lm is trl < 1.7's loss; the installed trl {have} "
                               f"computes SFT's loss with its fused LM head (--loss chunked-nll)")
    return trl


#: The SFTConfig flags that give each precision recipe on a model already built in its dtype
#: (setup.Precision.comes_from): pure recipes run without autocast, amp-* with it over fp32 weights
_PRECISION_FLAGS = {Precision.FP32: dict(bf16=False, fp16=False), Precision.BF16: dict(bf16=False, fp16=False),
                    Precision.FP16: dict(bf16=False, fp16=False), Precision.AMP_BF16: dict(bf16=True, fp16=False)}


def _tokenizer():
    """A tokenizer that knows only <pad> and <eos>: the dataset is tokenized already, and the
    collator only reads the pad token's id."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@contextlib.contextmanager
def _tag_fused_head(tracker):
    """What TRL's fused LM head allocates is logits, in forward and in backward (its
    ``ChunkedLogProbFunction``, trl 1.16.0 trl/kernels/chunked_logprob.py:299); after its
    backward returns, backward's allocations are temporaries. Patched on the class and
    restored on exit."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as F
    forward, backward = F.__dict__["forward"], F.__dict__["backward"]

    def tagged_forward(ctx, *args, **kwargs):
        previous, tracker.default_category = tracker.default_category, Category.LOGITS
        try:
            return forward.__func__(ctx, *args, **kwargs)
        finally:
            tracker.default_category = previous

    def tagged_backward(ctx, *args):
        tracker.default_category = Category.LOGITS
        try:
            return backward.__func__(ctx, *args)
        finally:
            tracker.default_category = Category.TEMPORARIES

    F.forward, F.backward = staticmethod(tagged_forward), staticmethod(tagged_backward)
    try:
        yield
    finally:
        F.forward, F.backward = forward, backward



def example_lengths(setup: Setup) -> list[int]:
    """One batch's example lengths under ``--packing`` (setup.Packing), each batch the same:

    - padded: the longest at ``seq``, the others shorter, ``seq - i * seq // (2 * batch)``;
    - packed: per bin ``seq // 2, seq // 4`` and the rest, which best-fit decreasing packs back
      into full bins of ``seq`` (trl 1.16.0 trl/data_utils.py:730 _pack_bfd: the halves open the
      bins, each quarter fills the smallest space it fits);
    - padding-free: pairs ``seq + seq // 4, seq - seq // 4`` (an odd batch's last at ``seq``):
      ``batch x seq`` tokens, the mean ``seq``.
    """
    b, s = setup.batch, setup.seq
    if setup.packing is Packing.PADDED:
        return [s - i * s // (2 * b) for i in range(b)]
    if setup.packing is Packing.PACKED:
        return [length for _ in range(b) for length in (s // 2, s // 4, s - s // 2 - s // 4)]
    if setup.packing is Packing.PADDING_FREE:
        return [s + (s // 4 if i % 2 == 0 else -(s // 4)) if i < b - b % 2 else s for i in range(b)]
    return [s] * b


def _dataset(spec, setup: Setup, steps: int, device):
    """The in-memory dataset: ``grad_accum x (steps + 1)`` batches of :func:`example_lengths`
    rows of synthetic token ids (cut from the setup's synthetic batch, which is wide enough); with
    ``--completion-only`` a ``completion_mask`` column marks each row's last tokens, from which
    SFTTrainer builds the labels (trl 1.16.0 sft_trainer.py:1408-1433)."""
    import datasets
    lengths = example_lengths(setup)
    wide = real_ids(spec, setup.replace(batch=1, seq=max(lengths), packing=None, completion_only=None)).tolist()[0]
    rows = [wide[:n] for n in lengths] * (setup.grad_accum * (steps + 1))
    columns = {"input_ids": rows}
    if setup.completion_only:
        c = setup.completion_only
        columns["completion_mask"] = [[0] * (len(r) - c) + [1] * c for r in rows]
    return datasets.Dataset.from_dict(columns)


def _packing_flags(setup: Setup) -> dict:
    """SFTConfig's flags for ``--packing``: packing with the default "bfd" strategy at max_length
    seq (padding-free turned on by it, sft_trainer.py:916); padding_free with max_length None,
    which TRL requires without packing (:999-1004); batches read in order
    (``train_sampling_strategy="sequential"``, transformers 5.24 training_args.py:638) so each
    batch is the one :func:`example_lengths` names."""
    if setup.packing is Packing.PACKED:
        return dict(packing=True, packing_strategy="bfd", max_length=setup.seq, train_sampling_strategy="sequential")
    if setup.packing is Packing.PADDING_FREE:
        return dict(packing=False, padding_free=True, max_length=None, train_sampling_strategy="sequential")
    return dict(packing=False, max_length=setup.seq, train_sampling_strategy="sequential")


def trainer_phases(built, tracker, meter, first, timings):
    """The callback that cuts a TRL trainer's steps into the harness's phases (module
    docstring), and ``current()``: the meter of the step running (``first`` in step 0)."""
    from transformers import TrainerCallback
    state = {"step": 0, "t0": 0.0}

    def current():
        return meter if state["step"] else first

    class Phases(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            state["step"] = st.global_step
            if built.before_step is not None:
                built.before_step(st.global_step)
            if st.global_step:
                tracker.mark("empty_cache")
            state["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, st, control, **kwargs):
            current().begin(Phase.OPTIMIZER, Category.TEMPORARIES)

        def on_optimizer_step(self, args, st, control, **kwargs):
            current().end()
            current().begin(Phase.ZERO_GRAD, Category.TEMPORARIES)

        def on_step_end(self, args, st, control, **kwargs):
            current().end()
            seconds = round(time.perf_counter() - state["t0"], 6)
            (timings.step_s if state["step"] else timings.warmup_s).append(seconds)

    return current, Phases()

def measure_loss_and_backward(trainer, setup: Setup, tracker, current) -> None:
    """Wrap a TRL trainer's ``compute_loss`` (the forward phase) and its accelerator's
    ``backward`` (the backward phase; a checkpointed layer's recomputation counted as
    activations) in the meter's phases (``current``: the meter of the step running)."""
    from profiler.measure.steps import recomputation_as_activations
    compute_loss, backward = trainer.compute_loss, trainer.accelerator.backward

    def measured_loss(*args, **kwargs):
        with current()(Phase.FORWARD, Category.ACTIVATIONS):
            return compute_loss(*args, **kwargs)

    def measured_backward(*args, **kwargs):
        recompute = recomputation_as_activations(tracker) if setup.grad_ckpt else contextlib.nullcontext()
        with current()(Phase.BACKWARD, Category.LOGITS), recompute:
            return backward(*args, **kwargs)

    trainer.compute_loss, trainer.accelerator.backward = measured_loss, measured_backward


def on_the_sim(built) -> bool:
    """Whether ``built`` is the sim's (its contexts hold a ``FakeTensorMode``; others are
    bitsandbytes' kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return any(isinstance(c, FakeTensorMode) for c in built.contexts)


def real_ids(spec, setup: Setup):
    """The setup's synthetic batch as real CPU ids, under the sim too (a dataset holds values)."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        return synthetic_batch(spec, setup, "cpu")


def trl_policy(built, setup: Setup, trainer: str, sim_reason: str | None = None):
    """The model a TRL trainer gets from the harness's build, and the ``peft_config`` it applies
    itself (LoRA: TRL wraps the base model, so the reference can be the adapter disabled); refused
    in one sentence where the harness cannot drive ``trainer`` (``sim_reason``: why not on the sim,
    where it cannot)."""
    if setup.precision not in _PRECISION_FLAGS:
        raise SetupUnavailable(f"--trainer {trainer} runs fp32, bf16, fp16 and amp-bf16 here, not {setup.precision}")
    if setup.mode is Mode.QLORA and trainer != "dpo":
        raise SetupUnavailable(f"--trainer {trainer} --mode qlora is estimated, not run by the harness yet (--mode "
                               f"full or lora)")
    if sim_reason and on_the_sim(built):
        raise SetupUnavailable(f"--trainer {trainer} does not run on the sim: {sim_reason}")
    if built.device.split(":")[0] not in ("cpu", "cuda") or built.forward is not built.inner:
        raise SetupUnavailable(f"--trainer {trainer} runs on one device (not on distributed ranks yet)")
    model, peft_config = built.forward, None
    if setup.mode in (Mode.LORA, Mode.QLORA):
        peft_config = model.peft_config["default"]
        model = model.unload()
    return model, peft_config


def measure_trainer(trainer, setup: Setup, tracker, current, name: str) -> None:
    """Give a TRL trainer that made its own policy (and adapter) the harness's optimizer and its
    meters: the policy's weights tracked, its gradients and the optimizer's state watched, the
    forward and backward phases wrapped (:func:`measure_loss_and_backward`)."""
    policy = trainer.model
    tracker.track(policy, Category.WEIGHTS)  # the adapter TRL made
    opt = build_optimizer(policy, setup)
    if opt is None:
        raise SetupUnavailable(f"--trainer {name} needs an optimizer: the Trainer steps one (leave --optimizer adamw)")
    trainer.optimizer = opt  # the harness's own, as SFT's optimizers=(opt, None)
    tracker.watch_grads([p for p in policy.parameters() if p.requires_grad])
    tracker.watch_optimizer(opt)
    measure_loss_and_backward(trainer, setup, tracker, current)


def train_measured(trainer, tracker, sim: bool, *contexts) -> None:
    """``trainer.train()`` with the fused head's allocations tagged and ``contexts`` entered (on the
    sim, real batches and :func:`driven_on_the_sim`); the tracker's hooks removed after."""
    if sim:
        real_batches(trainer)
    try:
        with _tag_fused_head(tracker), driven_on_the_sim(sim), contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            trainer.train()
    finally:
        tracker.remove_hooks()


def sft_train_steps(built, spec, setup: Setup, steps: int, tracker, meter, timings, first) -> None:
    """``1 + steps`` optimizer steps of the real ``SFTTrainer``: the first on ``first``, the rest on
    ``meter``, cut into the harness's phases (module docstring)."""
    trl = _require_trl(setup)

    if setup.precision not in _PRECISION_FLAGS:
        raise SetupUnavailable(f"--trainer sft runs fp32, bf16, fp16 and amp-bf16 here, not {setup.precision}")
    inner, device = built.inner, built.device
    sim = on_the_sim(built)
    if device.split(":")[0] not in ("cpu", "cuda") or built.forward is not inner:
        raise SetupUnavailable("--trainer sft runs on one device (not on distributed ranks yet)")
    opt = build_optimizer(inner, setup)
    if opt is None:
        raise SetupUnavailable("--trainer sft needs an optimizer: the Trainer steps one (leave --optimizer adamw)")
    tracker.watch_grads([p for p in inner.parameters() if p.requires_grad])
    tracker.watch_optimizer(opt)
    data = _dataset(spec, setup, steps, device)
    current, phases = trainer_phases(built, tracker, meter, first, timings)

    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(
            output_dir=out, max_steps=steps + 1, per_device_train_batch_size=setup.batch,
            gradient_accumulation_steps=setup.grad_accum, gradient_checkpointing=setup.grad_ckpt,
            **_packing_flags(setup), completion_only_loss=bool(setup.completion_only), use_cpu=device == "cpu",
            report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            **_PRECISION_FLAGS[setup.precision])
        with driven_on_the_sim(sim):
            trainer = trl.SFTTrainer(model=built.forward, args=config, train_dataset=data,
                                     processing_class=_tokenizer(), optimizers=(opt, None), callbacks=[phases])
        measure_loss_and_backward(trainer, setup, tracker, current)
        if sim:
            real_batches(trainer)
        try:
            with _tag_fused_head(tracker), driven_on_the_sim(sim):
                trainer.train()
        finally:
            tracker.remove_hooks()
            del trainer
