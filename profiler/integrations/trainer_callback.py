"""A ``transformers.TrainerCallback`` that records the peak memory of every training step.

::

    from profiler.integrations.trainer_callback import VramCallback
    with VramCallback(spec=spec, setup=setup, out="runs/steps.jsonl") as cb:
        Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
    cb.records  # one profiler.record.Record per optimizer step

A step runs from ``on_step_begin`` (before the forward of its first micro-batch) to
``on_step_end`` (after ``optimizer.step()``, the scheduler and ``zero_grad``), as
``transformers.Trainer._inner_training_loop`` calls them; with gradient accumulation
that spans all of the step's micro-batches.

``cuda`` backend
    ``reset_peak_memory_stats`` at the step's start, ``max_memory_allocated`` at its end
    (and ``max_memory_reserved``): absolute bytes on the device, as the harness records.
``cpu`` backend
    One :class:`~profiler.measure.tracker.StorageTracker` for the run: the model's parameters
    and buffers are tracked as weights at ``on_train_begin``, gradients and optimizer
    state are tagged as they appear (``watch_grads``, ``watch_optimizer``), and the
    tracker is entered for each step only (``on_step_begin`` .. ``on_step_end``), its
    peak restarted at every step. So the peak is absolute too: weights + optimizer
    state + whatever the step allocates. The batch is prefetched before ``on_step_begin``
    and is not counted (a few KiB of token ids). The mode is entered in one callback and
    left in another, so an exception between the two would leave it installed: the
    Trainer that calls ``on_init_end`` / ``on_train_begin`` (found as the ``self`` of a
    calling frame) has its ``train`` wrapped, and an exception leaving ``train()`` records
    the failed step (``oom`` or ``error``, as data) and calls ``close()``. A callback added
    with ``add_callback`` is guarded from its second ``train()`` on; ``close()`` (or leaving
    the ``with`` block) covers the rest.

The backend is where the model's parameters live (``use_cpu=True`` on a GPU host is
``cpu``), unless ``backend=`` says otherwise.

At ``on_train_end`` the callback prints one line (:meth:`VramCallback.summary`): the run's
peak beside the estimate and where the records went. The ``out`` JSONL is a records file
like a sweep's: ``vramlab validate trainer-peaks.jsonl`` puts every step beside its
estimate (the first step beside the first step's), ``vramlab compare`` gates two runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from estimator.categories import Category, Phase
from estimator.modelspec import ModelSpec, spec_from_config
from estimator.setup import Device, Loop, Loss, Mode, Optimizer, OptimizerImpl, Precision, RefModel, Setup, Trainer
from estimator.units import GiB
from profiler.measure.run import device_info, prediction
from profiler.measure.steps import Meter, classify_failure, summarise
from profiler.measure.tracker import StorageTracker
from profiler.record import Case, Record, Status, append_record, check_record, new_record

__all__ = ["VramCallback"]

BACKENDS = ("cuda", "cpu")


class VramCallback(TrainerCallback):
    """Per-step peak memory of a ``transformers.Trainer`` run, as profiler records.

    Args:
        spec, setup: the estimator's model and setup, given together; left out, they are
            read from the model's config and the ``TrainingArguments`` (batch, gradient
            accumulation, checkpointing, precision, optimizer, LoRA) and the first batch's
            sequence length (:func:`setup_from_trainer`). Each record carries the estimate
            under ``predicted``; the first record is flagged ``first_step`` and is compared
            with the estimate's first step.
        out: JSONL file each record is appended to (``profiler.record.append_record``).
        backend: ``"cuda"`` or ``"cpu"``; ``None`` picks the device of the model's
            parameters at ``on_train_begin``.
        model_name: the ``case.model`` of the records (default: ``spec.name``, else the
            model config's ``name_or_path`` or ``model_type``).
    """

    def __init__(self, spec: ModelSpec | None = None, setup: Setup | None = None,
                 out: str | Path | None = None, backend: str | None = None,
                 model_name: str | None = None) -> None:
        if (spec is None) != (setup is None):
            raise ValueError("pass spec and setup together (the estimate needs both), or neither")
        if spec is not None and not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be an estimator ModelSpec, got {type(spec).__name__}")
        if setup is not None and not isinstance(setup, Setup):
            raise TypeError(f"setup must be an estimator Setup, got {type(setup).__name__}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)} "
                             f"(or leave it None to follow the model's device)")
        self.spec = spec
        self.setup = setup
        self._given = setup is not None
        self.out = Path(out) if out is not None else None
        self.backend = backend
        self.model_name = model_name
        self.predicted = prediction(spec, setup, harness=False) if spec is not None else None
        self._args: Any = None
        self._model: Any = None
        self._seq: int | None = None
        self._seq_hook: Any = None
        self.records: list[Record] = []
        self._tracker: StorageTracker | None = None
        self._meter: Meter | None = None
        self._case: Case | None = None
        self._device: dict | None = None
        self._step = 0
        self._watched: Any = None  # the optimizer whose state the tracker tags

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> VramCallback:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._abandon(exc)

    def _abandon(self, exc: BaseException | None) -> None:
        """Training ended by ``exc``: the step that raised is a record (oom or error, as data)
        when it was an Exception; the tracker is closed whatever happens while recording it."""
        try:
            if exc is not None and self._meter is not None and isinstance(exc, Exception):
                self._finish_step(*classify_failure(exc))
        finally:
            self.close()

    def _guard(self) -> None:
        """Wrap the calling Trainer's ``train`` so an exception leaving it ends in :meth:`_abandon`."""
        trainer = _calling_trainer()
        if trainer is None or getattr(trainer.train, "_vramlab_guard", None) is self:
            return
        train = trainer.train

        @functools.wraps(train)
        def guarded(*args, **kwargs):
            try:
                return train(*args, **kwargs)
            except BaseException as exc:
                self._abandon(exc)
                raise
        guarded._vramlab_guard = self
        trainer.train = guarded

    def close(self) -> None:
        """Leave the tracker's dispatch mode and remove its hooks (idempotent)."""
        self._meter = None
        tracker = self._tracker
        if tracker is None:
            return
        if tracker.active:
            from torch.utils._python_dispatch import _get_current_dispatch_mode

            if _get_current_dispatch_mode() is tracker:
                tracker.__exit__(None, None, None)
            else:  # __exit__ pops whatever mode is on top: never pop someone else's
                warnings.warn("VramCallback: another dispatch mode sits above the step's tracker, "
                              "so it was left in place; its counts after this point are not used",
                              RuntimeWarning, stacklevel=2)
        tracker.remove_hooks()
        self._tracker = None
        self._watched = None

    # ------------------------------------------------------------------ callback events
    def on_init_end(self, args, state, control, **kwargs):
        self._guard()
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()  # a previous train() that raised mid-step
        self._guard()
        if model is None:
            raise ValueError("VramCallback needs the model: the Trainer passes it to callbacks")
        if self.backend is None:
            param = next(model.parameters(), None)
            self.backend = "cuda" if param is not None and param.device.type == "cuda" else "cpu"
        self._args, self._model = args, model
        if self.spec is None:
            self.spec = _spec_of(model)
        if not self._given:  # the sequence length comes with the first batch
            self._seq_hook = model.register_forward_pre_hook(self._see_batch, with_kwargs=True)
        self._case = self._make_case(model, state)
        self._device = device_info(self.backend)
        tracker = StorageTracker()
        if self.backend == "cpu":
            from profiler.measure.quant import quant_state_tensors
            tracker.track(model, Category.WEIGHTS)
            tracker.track(quant_state_tensors(model), Category.WEIGHTS)  # bitsandbytes' state: no parameters
            tracker.watch_grads(model)
            self._tracker = tracker
            self._watch(optimizer)
        self._idle_tracker = tracker  # cuda: the meter's tracker sees nothing; the allocator measures
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        tracker = self._tracker or self._idle_tracker
        if self._tracker is not None:
            self._watch(optimizer)  # the optimizer may be created after on_train_begin
            if not tracker.active:
                tracker.__enter__()
        self._step = state.global_step + 1
        self._meter = Meter(tracker, cuda=self.backend == "cuda")
        self._meter.begin(Phase.STEP, Category.ACTIVATIONS)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._tracker is not None:  # what optimizer.step() makes beyond its state
            self._tracker.default_category = Category.TEMPORARIES
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self._meter is not None:
            self._finish_step(Status.OK, "")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if self.records:
            print(self.summary(), flush=True)
        return control

    def summary(self) -> str:
        """One line about the run so far: its peak beside the estimate, and where the
        records are (``vramlab validate FILE`` reads them); ``on_train_end`` prints it."""
        if not self.records:
            return "vramlab: no step measured"
        steady = self.records[1:] or self.records  # the first step is compared with its own estimate
        peak = max(steady, key=lambda r: r.measured.peak_allocated_bytes or 0)
        measured = peak.measured.peak_allocated_bytes or 0
        precision = (peak.case.setup or {}).get("precision")
        recipe = f" (precision {precision})" if precision else ""
        text = (f"vramlab: {len(self.records)} steps of {peak.case.model} on {peak.backend}{recipe}: "
                f"peak {measured / GiB:.2f} GiB at step {peak.step}")
        if peak.predicted is not None and measured:
            est = peak.predicted.allocated_bytes
            text += f", estimate {est / GiB:.2f} GiB ({100 * (est - measured) / measured:+.1f}%)"
        where = f"records in {self.out} (vramlab validate {self.out})" if self.out else "records in .records"
        return f"{text}; {where}"

    # ------------------------------------------------------------------ helpers
    def _see_batch(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and self._seq is None:
            self._seq = int(ids.shape[-1])

    def _predict(self) -> None:
        """The setup and estimate, once the first batch has shown the sequence length."""
        if self._given or self.predicted is not None or self.spec is None or self._seq is None:
            return
        if self._seq_hook is not None:
            self._seq_hook.remove()
            self._seq_hook = None
        try:
            self.setup = setup_from_trainer(self._model, self._args, self._seq, self.backend)
            self.predicted = prediction(self.spec, self.setup, harness=False)
        except ValueError as exc:  # a model or option the estimator cannot read: records without it
            warnings.warn(f"VramCallback: no estimate beside the records ({exc})", RuntimeWarning, stacklevel=2)
            self.spec = None
        self._case.setup = self.setup.to_dict() if self.setup is not None else None

    def _finish_step(self, status: Status, message: str) -> None:
        meter, self._meter = self._meter, None
        meter.end()
        tracker = meter.tracker
        if self._tracker is not None and tracker.active:
            self._leave_step()
        self._predict()
        record = new_record(self._case, status, message, predicted=self.predicted, source="trainer_callback",
                            step=self._step, device=self._device, first_step=not self.records)
        summarise(record, meter, tracker, None, self.backend == "cuda", 0)
        if self.backend == "cpu":
            record.measured.end_bytes = int(tracker.current_bytes)
            record.measured.rss_peak_bytes = record.measured.rss_before_bytes = None
        check_record(record.to_json(), f"VramCallback record of step {self._step}")
        self.records.append(record)
        if self.out is not None:
            append_record(self.out, record)

    def _leave_step(self) -> None:
        """Leave the tracker's mode at the end of a step, keeping it (and its hooks) for the next."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        tracker = self._tracker
        if _get_current_dispatch_mode() is tracker:
            tracker.__exit__(None, None, None)
        else:
            self.close()
            raise RuntimeError("VramCallback: a dispatch mode entered during the step is still active "
                               "at on_step_end, so the step's tracker cannot be left safely")

    def _watch(self, optimizer: Any) -> None:
        if optimizer is None or self._tracker is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if inner is self._watched:
            return
        self._tracker.watch_optimizer(inner)
        self._tracker.track(inner, Category.OPTIMIZER_STATE)  # state that already exists
        self._watched = inner

    def _make_case(self, model: Any, state: Any) -> Case:
        config = getattr(model, "config", None)
        if self.spec is not None:
            name, config_hash = self.spec.name, self.spec.config_hash
        else:
            raw = config.to_dict() if config is not None else {}
            name = getattr(config, "name_or_path", "") or raw.get("model_type") or type(model).__name__
            try:
                config_hash = spec_from_config(raw, name=name).config_hash
            except ValueError:  # an architecture the estimator cannot read: hash the dict itself
                text = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
                config_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        return Case(model=self.model_name or name, config_hash=config_hash,
                    setup=self.setup.to_dict() if self.setup is not None else None,
                    steps=int(state.max_steps), backend=self.backend)


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling us: the ``self`` of a
    calling frame (``Trainer.__init__`` calls ``on_init_end``, ``_inner_training_loop``
    calls ``on_train_begin``); None when there is none."""
    from transformers import Trainer
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


def _spec_of(model: Any) -> ModelSpec | None:
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    if config is None:
        return None
    raw = config.to_dict()
    try:
        return spec_from_config(raw, name=getattr(config, "name_or_path", "") or raw.get("model_type", "model"))
    except ValueError:
        return None


#: transformers OptimizerNames (training_args.py) -> the estimator's optimizer and implementation
_OPTIMIZERS = {"adamw_torch_fused": (Optimizer.ADAMW, OptimizerImpl.FUSED),
               "adamw_torch": (Optimizer.ADAMW, OptimizerImpl.AUTO),
               "sgd": (Optimizer.SGD, OptimizerImpl.AUTO),
               "adafactor": (Optimizer.ADAFACTOR, OptimizerImpl.AUTO),
               "adamw_bnb_8bit": (Optimizer.ADAMW_8BIT, OptimizerImpl.AUTO),
               "adamw_8bit": (Optimizer.ADAMW_8BIT, OptimizerImpl.AUTO),
               "paged_adamw_8bit": (Optimizer.PAGED_ADAMW_8BIT, OptimizerImpl.AUTO)}


def setup_from_trainer(model: Any, args: Any, seq: int, backend: str) -> Setup:
    """The estimator's setup of a ``transformers.Trainer`` run: the per-device batch,
    ``gradient_accumulation_steps``, ``gradient_checkpointing``, the precision (the
    parameters' dtype, with autocast when ``bf16``/``fp16`` is set over fp32 weights), the
    optimizer (``optim``; the Trainer's default on torch >= 2.8 is ``adamw_torch_fused``),
    LoRA from a peft model, the attention implementation and ``use_cache`` from the config,
    the Trainer's own loop (outputs dropped before backward, ``model.zero_grad()`` setting
    gradients to None). ``ValueError`` for an optimizer the estimator does not model."""
    param = next(model.parameters())
    dtype = param.dtype
    if dtype == torch.float32:
        precision = Precision.AMP_BF16 if args.bf16 else Precision.AMP_FP16 if args.fp16 else Precision.FP32
    else:
        precision = Precision.BF16 if dtype == torch.bfloat16 else Precision.FP16
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in _OPTIMIZERS:
        raise ValueError(f"optimizer {optim!r} is not one the estimator models ({', '.join(sorted(_OPTIMIZERS))})")
    optimizer, impl = _OPTIMIZERS[optim]
    kw: dict[str, Any] = {}
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        lora = next(iter(peft_config.values()))
        kw = dict(mode=Mode.LORA, lora_rank=int(lora.r), lora_alpha=int(lora.lora_alpha),
                  lora_targets=tuple(sorted(lora.target_modules)) if not isinstance(lora.target_modules, str)
                  else (lora.target_modules,))
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    attn = {"flash_attention_2": "flash"}.get(getattr(config, "_attn_implementation", "sdpa"),
                                              getattr(config, "_attn_implementation", "sdpa"))
    ckpt = bool(args.gradient_checkpointing)
    kw.update(_sft_fields(args))
    kw.update(_dpo_fields(args, backend, bool(peft_config)))
    return Setup(precision=precision, optimizer=optimizer, optimizer_impl=impl,
                 batch=int(args.per_device_train_batch_size), seq=seq, grad_ckpt=ckpt, attn=attn,
                 device=Device.CUDA if backend == "cuda" else Device.CPU,
                 grad_accum=int(args.gradient_accumulation_steps), loop=Loop.TRAINER,
                 use_cache=bool(getattr(config, "use_cache", False)) and not ckpt, **kw)


def _dpo_fields(args: Any, backend: str, adapters: bool) -> dict:
    """A TRL ``DPOConfig``'s trainer (``{}`` otherwise, or without trl): the fused LM head
    (trl 1.16.0 dpo_trainer.py:954-962), the reference precomputed where
    ``precompute_ref_log_probs`` is set, else the one TRL makes by the mode (``Setup.ref_model``):
    the adapter disabled with peft, a separate copy without (a ``ref_model`` passed to the trainer
    is not visible here). On the cpu backend the callback tracks the tensors of the model the
    Trainer gives it, so a separate reference is outside what it measures: it says so."""
    try:
        from trl import DPOConfig
    except ImportError:
        return {}
    if not isinstance(args, DPOConfig):
        return {}
    ref = RefModel.PRECOMPUTED if args.precompute_ref_log_probs else None
    if ref is None and not adapters and backend == "cpu":
        warnings.warn("VramCallback: DPOTrainer's separate reference model is not the model the Trainer passes to "
                      "callbacks, so on the cpu backend the records leave its weights out while the estimate counts "
                      "them", RuntimeWarning, stacklevel=3)
    return dict(trainer=Trainer.DPO, loss=Loss.CHUNKED_NLL, ref_model=ref)


def _sft_fields(args: Any) -> dict:
    """A TRL ``SFTConfig``'s trainer and loss path (``{}`` for plain ``TrainingArguments``, or
    without trl): trl >= 1.7 computes every ``"nll"`` / ``"dft"`` loss with its fused LM head
    (trl 1.16.0 sft_trainer.py:1611; ``estimator/trainers.py``), earlier releases only with
    ``loss_type="chunked_nll"``. A ``compute_loss_func`` or label smoothing (the full logits
    again, sft_trainer.py:1592-1609) is not visible here and not modelled."""
    try:
        from trl import SFTConfig
    except ImportError:
        return {}
    if not isinstance(args, SFTConfig):
        return {}
    from estimator.versions import semantics_for
    chunked = semantics_for(()).sft_loss_chunked or getattr(args, "loss_type", "") == "chunked_nll"
    return dict(trainer=Trainer.SFT, loss=Loss.CHUNKED_NLL if chunked else Loss.CAUSAL_LM)
