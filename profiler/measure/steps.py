"""The one step loop and what every run shares around it.

- :class:`Meter` measures one phase of a step: the tracker's phase always (live tensor
  bytes per category), and on CUDA the caching allocator's peaks, reset at the phase's
  start (``torch.cuda.reset_peak_memory_stats``, read with ``max_memory_allocated`` /
  ``max_memory_reserved`` at its end). It keeps the worst step of each phase. It opens
  and closes phases either as a context manager (the loops below) or with
  :meth:`Meter.begin` / :meth:`Meter.end` (a Trainer callback, whose step begins and
  ends in two different callbacks).
- :func:`train_step` / :func:`run_steps`: the first step, measured apart (optimizer state
  and library handles are made in it), then N steady-state steps, each split into forward,
  backward (per micro-batch), optimizer and zero_grad; an evaluation runs one no-grad
  forward with the loss; inference a prefill and ``new_tokens`` decode steps. :class:`Model`
  carries what the loop needs of a built model and its hooks (DDP's bucket rebuild).
- :func:`classify_failure`: an exception as a status and one line (OOM is a data point;
  cuBLAS/cuDNN allocation failures arrive as plain RuntimeErrors and count as OOM).
- :func:`summarise`: the record's measured peaks from the meter, the tracker and NVML.
"""
from __future__ import annotations

import contextlib
import gc
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from estimator.categories import Category, Phase
from estimator.setup import Device, Loop, Loss, Mode, Setup, Trainer
from profiler.measure.build import SetupUnavailable, autocast_context, build_optimizer, synthetic_batch
from profiler.measure.compat import keep_last_logits
from profiler.measure.nvml import NvmlSampler
from profiler.measure.recompute import around_recomputation
from profiler.measure.tracker import StorageTracker
from profiler.record import PhaseMeasure, Record, Status, Timings

#: torch.cuda.memory_stats() keys kept per phase (CUDACachingAllocator DeviceStats)
CUDA_STATS = ("num_alloc_retries", "num_ooms", "active_bytes.all.peak",
              "inactive_split_bytes.all.peak", "segment.all.peak", "requested_bytes.all.peak")
MESSAGE_CHARS = 300


class Meter:
    """Measures phases of steps: the tracker always, the CUDA allocator's peaks on cuda."""

    def __init__(self, tracker: StorageTracker, cuda: bool):
        self.tracker = tracker
        self.cuda = cuda
        self.phases: dict[str, PhaseMeasure] = {}
        self._open: contextlib.ExitStack | None = None
        self._record = None
        self._phase = ""

    def begin(self, phase: Phase, default: Category) -> None:
        self.tracker.default_category = default
        self.tracker.mark(("begin", id(self), phase.value))
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._open = contextlib.ExitStack()
        self._record = self._open.enter_context(self.tracker.phase(phase.value))
        self._phase = phase.value

    def end(self) -> None:
        stack, rec, phase = self._open, self._record, self._phase
        if stack is None:
            return
        self._open = self._record = None
        stack.close()
        self.tracker.mark(("end", id(self), phase))
        if self.cuda:
            torch.cuda.synchronize()
            alloc, reserved = int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
        else:
            alloc, reserved = int(rec.peak_bytes), None
        prev = self.phases.get(phase)
        if prev is None or alloc > prev.peak_allocated_bytes:  # keep the worst step
            entry = PhaseMeasure(peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                                 tracked_peak_bytes=int(rec.peak_bytes), start_bytes=int(rec.start_bytes),
                                 end_bytes=int(self.tracker.current_bytes),
                                 categories={k: int(v) for k, v in rec.peak_breakdown.items()})
            if self.cuda:
                entry.untracked_bytes = max(0, alloc - int(rec.peak_bytes))
                stats = torch.cuda.memory_stats()
                entry.memory_stats = {k: int(stats.get(k, 0)) for k in CUDA_STATS}
            self.phases[phase] = entry

    @contextlib.contextmanager
    def __call__(self, phase: Phase, default: Category) -> Iterator[None]:
        self.begin(phase, default)
        try:
            yield
        finally:
            self.end()


@dataclass
class Model:
    """A built model as the loop sees it: ``forward`` is what runs the step (a DDP or
    FSDP wrapper, or the model itself), ``inner`` the transformers model (its parameters,
    output head, generation cache). ``before_step(step)`` runs before each step."""

    forward: torch.nn.Module
    inner: torch.nn.Module
    device: str
    before_step: Callable[[int], None] | None = None
    contexts: list = field(default_factory=list)  # entered around the steps (fake mode, FSDP hooks)
    analytic: dict[str, int] = field(default_factory=dict)  # non-tensor bytes a sim adds to every phase
    make_optimizer: Callable | None = None  # (module, setup) -> optimizer; default build.build_optimizer


def recomputation_as_activations(tracker: StorageTracker):
    """While backward runs, a checkpointed layer's recomputation allocates activations,
    whatever the backward's own default (profiler/measure/recompute.py)."""
    stack: list = []

    def enter() -> None:
        stack.append(tracker.default_category)
        tracker.default_category = Category.ACTIVATIONS

    def leave() -> None:
        tracker.default_category = stack.pop()

    return around_recomputation(enter, leave)


def _gradient_sync(model: torch.nn.Module, sync: bool):
    """A micro-batch before the last one of gradient accumulation skips the gradient
    reduction, as accelerate's ``no_sync`` does: DDP's ``no_sync()``
    (torch/nn/parallel/distributed.py:1659, torch 2.13) and FSDP2's
    ``set_requires_gradient_sync(False)`` (torch/distributed/fsdp/_fully_shard/_fully_shard.py:413),
    after which ``FSDPParamGroup.post_backward`` skips the reduce-scatter and keeps each
    parameter's unsharded gradient (_fsdp_param_group.py:605-611, ``to_accumulated_grad_if_needed``
    and ``accumulate_unsharded_grad_if_needed`` in _fsdp_param.py:802-815) until the
    synced micro-batch reduce-scatters the sum. One device: nothing to skip."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return unsynced()
    return contextlib.nullcontext()


def train_step(model, opt, ids, setup: Setup, device: str, measure, held: dict | None = None) -> float:
    """One optimizer step of ``setup.grad_accum`` micro-batches, split into measured phases
    (a phase's peak is the worst micro-batch's); returns its wall time in seconds. ``device``
    may name an index (``cuda:1``).

    The loop: the Trainer's drops the model's outputs before backward (``compute_loss``
    returns the loss, scaled by the accumulation steps, trainer.py); a hand-written loop
    (``out = model(**batch); out.loss.backward()``) keeps them until after. Gradients
    are set to None after the step, or zeroed and kept (``keep_grads``).

    Categories in backward: the loss's backward buffers are logits until the gradient of
    the LM head's output exists (a hook on that tensor, :func:`_tag_head`); from then on
    what backward allocates is temporaries (activation gradients, a weight's gradient until
    it lands in ``.grad``, which the tracker then calls gradients), except a recomputed
    checkpointed layer's activations."""
    kind = device.split(":")[0]
    t0 = time.perf_counter()
    for micro in range(setup.grad_accum):
        recompute = recomputation_as_activations(measure.tracker) if setup.grad_ckpt else contextlib.nullcontext()
        with _gradient_sync(model, micro == setup.grad_accum - 1):
            with measure(Phase.FORWARD, Category.ACTIVATIONS):
                with autocast_context(setup, kind):
                    out = model(**_loss_inputs(ids, setup), use_cache=setup.use_cache)
                loss = out.logits.sum() if setup.loss is Loss.LOGITS_SUM else out.loss
                loss = loss / setup.grad_accum if setup.grad_accum > 1 else loss
                if setup.loop is Loop.TRAINER:
                    out = None
                elif setup.loop is Loop.HELD and held is not None:
                    held["out"] = out  # rebinding drops the previous step's outputs only now
            with measure(Phase.BACKWARD, Category.LOGITS), recompute:
                loss.backward()
                loss = None
            out = None
    if opt is not None:
        with measure(Phase.OPTIMIZER, Category.TEMPORARIES):
            opt.step()
    with measure(Phase.ZERO_GRAD, Category.TEMPORARIES):
        # no optimizer (--optimizer none): the module's zero_grad frees the same gradients
        (opt if opt is not None else model).zero_grad(set_to_none=not setup.keep_grads)
    if kind == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 6)


def _loss_inputs(ids, setup: Setup) -> dict:
    """The forward's inputs: labels for transformers' causal-LM loss; none for
    ``loss = logits.sum()`` and for a scoring forward (--loss none): the model then computes
    no loss."""
    if setup.loss in (Loss.LOGITS_SUM, Loss.NONE):
        return {"input_ids": ids}
    return {"input_ids": ids, "labels": ids}


def run_steps(built: Model, spec, setup: Setup, steps: int, tracker: StorageTracker, meter: Meter,
              timings: Timings, first: Meter) -> None:
    """The first step (optimizer state, cuBLAS handles, DDP's buckets are made in it),
    measured on ``first``, then ``steps`` steady-state steps on ``meter``; training, an
    evaluation forward or generation by the setup's mode."""
    if setup.trainer is Trainer.SFT:  # the real trl.SFTTrainer drives the steps
        from profiler.measure.trl_steps import sft_train_steps
        sft_train_steps(built, spec, setup, steps, tracker, meter, timings, first)
    elif setup.trainer is Trainer.DPO:  # the real trl.DPOTrainer drives the steps
        from profiler.measure.dpo_steps import dpo_train_steps
        dpo_train_steps(built, spec, setup, steps, tracker, meter, timings, first)
    elif setup.trainer is Trainer.GRPO:  # the real trl.GRPOTrainer drives the steps
        from profiler.measure.grpo_steps import grpo_train_steps
        grpo_train_steps(built, spec, setup, steps, tracker, meter, timings, first)
    elif setup.training:
        _train_steps(built, spec, setup, steps, tracker, meter, timings, first)
    elif setup.mode is Mode.EVAL:
        _eval_steps(built, spec, setup, steps, tracker, meter, timings, first)
    else:
        _infer_steps(built, spec, setup, steps, tracker, meter, timings, first)


def _train_steps(built: Model, spec, setup, steps, tracker, meter, timings, first) -> None:
    inner, device = built.inner, built.device
    opt = (built.make_optimizer or build_optimizer)(inner, setup)
    tracker.watch_grads([p for p in inner.parameters() if p.requires_grad])
    base_opt, masters = opt, []
    while not isinstance(base_opt, torch.optim.Optimizer) and hasattr(base_opt, "inner"):
        masters += getattr(base_opt, "masters", None) or []  # mixed-bf16's fp32 master weights
        if hasattr(base_opt, "on_master_grads"):
            base_opt.on_master_grads = lambda grads: tracker.track(grads, Category.GRADIENTS)
        base_opt = base_opt.inner
    if base_opt is not None:
        tracker.watch_optimizer(base_opt)
    if masters:
        tracker.track(masters, Category.OPTIMIZER_STATE)
    head = inner.get_output_embeddings()
    hooks = _tag_head(head, tracker)
    ids = synthetic_batch(spec, setup, device)
    cuda = device.startswith("cuda")
    held: dict = {}  # Loop.HELD: the last step's outputs, alive until the next forward returns
    try:
        for step in range(steps + 1):
            if built.before_step is not None:
                built.before_step(step)
            if step:
                tracker.mark("empty_cache")  # the sim's allocator replay does the same
            if step and cuda:
                gc.collect()
                torch.cuda.empty_cache()
            # (the held outputs only for Loop.HELD: the call stays the six-argument one otherwise)
            extra = {"held": held} if setup.loop is Loop.HELD else {}
            seconds = train_step(built.forward, opt, ids, setup, device, meter if step else first, **extra)
            (timings.step_s if step else timings.warmup_s).append(seconds)
    finally:
        held.clear()
        for hook in hooks:
            hook.remove()
        tracker.remove_hooks()


def _eval_steps(built: Model, spec, setup, steps, tracker, meter, timings, first) -> None:
    """``model(input_ids, labels=input_ids)`` under no_grad: full logits and the loss; without
    labels (--loss none, a scoring forward) the logits only."""
    model, device = built.forward, built.device
    hooks = _tag_head(built.inner.get_output_embeddings(), tracker)
    ids = synthetic_batch(spec, setup, device)
    try:
        with torch.no_grad(), cache_updates_as_kv(tracker):
            for step in range(steps + 1):
                t0 = time.perf_counter()
                with (meter if step else first)(Phase.FORWARD, Category.ACTIVATIONS):
                    with autocast_context(setup, device):
                        model(**_loss_inputs(ids, setup), use_cache=setup.use_cache)  # outputs dropped
                if device == "cuda":
                    torch.cuda.synchronize()
                (timings.step_s if step else timings.warmup_s).append(round(time.perf_counter() - t0, 6))
    finally:
        for hook in hooks:
            hook.remove()


def _tag_head(head: torch.nn.Module, tracker: StorageTracker) -> list:
    """Forward: what the LM head and the loss allocate is logits. Backward: once the
    gradient of the head's output exists, the loss's part is over (temporaries from then)."""
    def before(*_):
        tracker.default_category = Category.LOGITS

    def after(module, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: setattr(tracker, "default_category", Category.TEMPORARIES))

    return [head.register_forward_pre_hook(before), head.register_forward_hook(after)]


def _kv_tensors(cache):
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                yield t
    for name in ("key_cache", "value_cache"):  # transformers 4.x DynamicCache: per-layer lists
        for t in getattr(cache, name, None) or []:
            if isinstance(t, torch.Tensor):
                yield t


@contextlib.contextmanager
def cache_updates_as_kv(tracker: StorageTracker) -> Iterator[None]:
    """What transformers' cache allocates in ``Cache.update`` (the ``torch.cat`` of old and
    new keys and values, cache_utils.py) is the KV cache from its first byte. Patched on
    the class, restored on exit; a transformers without ``Cache.update`` is left alone."""
    try:
        from transformers import cache_utils
    except ImportError:
        yield
        return
    # transformers 5 updates every cache through Cache.update; 4.x caches define their own
    # (4.48.3 cache_utils.py DynamicCache.update)
    classes = [c for c in (getattr(cache_utils, n, None) for n in ("Cache", "DynamicCache"))
               if c is not None and "update" in vars(c)]
    originals = {cls: vars(cls)["update"] for cls in classes}

    def wrap(original):
        def update(self, *args, **kwargs):
            previous, tracker.default_category = tracker.default_category, Category.KV_CACHE
            try:
                out = original(self, *args, **kwargs)
            finally:
                tracker.default_category = previous
            # a cache that keeps the new keys and values by reference (4.x DynamicCache's
            # first update appends them: key_cache[layer_idx] is key_states) holds them from here on
            idx, lists = (args[2] if len(args) > 2 else None), (getattr(self, "key_cache", None),
                                                                  getattr(self, "value_cache", None))
            if isinstance(idx, int) and all(isinstance(x, list) and idx < len(x) for x in lists):
                held = [t for t in args[:2] if any(t is x[idx] for x in lists)]
                if held:
                    tracker.track(held, Category.KV_CACHE)
            return out
        return update

    for cls, original in originals.items():
        cls.update = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.update = original


def _infer_steps(built: Model, spec, setup, steps, tracker, meter, timings, first) -> None:
    model, device = built.forward, built.device
    ids = synthetic_batch(spec, setup, device)
    keep = keep_last_logits(model)
    with torch.no_grad(), cache_updates_as_kv(tracker):
        for step in range(steps + 1):
            measure = meter if step else first
            t0 = time.perf_counter()
            with measure(Phase.PREFILL, Category.ACTIVATIONS):
                with autocast_context(setup, device):
                    out = model(input_ids=ids, use_cache=True, **keep)
                cache = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                del out
            tracker.track(list(_kv_tensors(cache)), Category.KV_CACHE)
            for _ in range(setup.new_tokens):
                with measure(Phase.DECODE, Category.ACTIVATIONS):
                    with autocast_context(setup, device):
                        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **keep)
                    nxt = out.logits[:, -1:].argmax(-1)
                    del out
                tracker.track(list(_kv_tensors(cache)), Category.KV_CACHE)
            del cache, nxt
            if device == "cuda":
                torch.cuda.synchronize()
            (timings.step_s if step else timings.warmup_s).append(round(time.perf_counter() - t0, 6))


# ---------------------------------------------------------------------- one run
def classify_failure(exc: BaseException) -> tuple[Status, str]:
    """An exception from a run as (status, one line): out-of-memory is ``oom`` (a data
    point), everything else ``error``."""
    if isinstance(exc, SetupUnavailable):
        return Status.ERROR, str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return Status.OOM, (str(exc).splitlines() or ["out of memory"])[0][:MESSAGE_CHARS]
    text = str(exc)
    # cuBLAS/cuDNN allocation failures arrive as plain RuntimeErrors
    oom = "out of memory" in text.lower() or "ALLOC_FAILED" in text
    return (Status.OOM if oom else Status.ERROR), f"{type(exc).__name__}: {text[:MESSAGE_CHARS]}"


def measure_run(record: Record, spec, setup: Setup, steps: int, build: Callable[[StorageTracker], Model], *,
                cuda: bool, tracker: StorageTracker | None = None, sampler: NvmlSampler | None = None,
                timeline: bool = False) -> Record:
    """The skeleton every run shares: build (timed), enter the model's contexts and the
    tracker, run the steps, turn a failure into the record's status, summarise. Never
    raises for the run's own failures."""
    tracker = tracker if tracker is not None else StorageTracker(record_timeline=timeline)
    meter, first = Meter(tracker, cuda), Meter(tracker, cuda)
    replaying = record.backend == "sim" and setup.device is Device.CUDA and tracker.events is None
    if replaying:
        tracker.events = []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux
    analytic: dict[str, int] = {}
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        built = build(tracker)
        analytic = built.analytic
        record.timings.build_s = round(time.perf_counter() - t0, 6)
        if sampler is not None:
            sampler.start()
        with contextlib.ExitStack() as stack:
            for context in built.contexts:
                stack.enter_context(context)
            stack.enter_context(tracker)
            run_steps(built, spec, setup, steps, tracker, meter, record.timings, first)
    except Exception as exc:  # a data point too: the failure is recorded, the sweep goes on
        record.fail(*classify_failure(exc))
    finally:
        if sampler is not None:
            sampler.stop()
    try:
        summarise(record, meter, tracker, sampler, cuda, rss0, analytic, first)
        if replaying:
            replay_allocator(record, meter, tracker, setup, analytic)
    except Exception as exc:  # a summary bug must not lose the status of the run
        record.note(f"summary failed: {type(exc).__name__}: {exc}")
    finally:
        if replaying:
            tracker.events = None
    return record


def replay_allocator(record: Record, meter: Meter, tracker: StorageTracker, setup: Setup,
                     analytic: dict[str, int] | None) -> None:
    """A CUDA-semantics sim run: its tensor trace through the caching allocator's rules
    (profiler/measure/allocator.py) gives what ``max_memory_reserved`` and
    ``max_memory_allocated`` would say. Reserved goes where a GPU record has it; the
    allocator's counters go to each phase's ``memory_stats``, named as
    ``torch.cuda.memory_stats`` names them. ``peak_allocated_bytes`` stays the tensors'
    bytes (the allocator counts whole blocks: ``allocated_bytes.all.peak``)."""
    from profiler.measure.allocator import replay
    total = sum((analytic or {}).values())
    count = 2 if setup.training else 1  # sim.analytic_bytes: one cuBLAS workspace per thread
    stats = replay(tracker.events or [], id(meter), [total // count] * count if total else [],
                   conf=setup.allocator)  # the run's PYTORCH_CUDA_ALLOC_CONF (Setup.alloc_conf)
    m = record.measured
    for phase, p in m.phases.items():
        if phase in stats:
            p.memory_stats = dict(stats[phase])
            p.peak_reserved_bytes = stats[phase]["reserved_bytes.all.peak"]
    reserved = [p.peak_reserved_bytes for p in m.phases.values() if p.peak_reserved_bytes is not None]
    if reserved:
        m.peak_reserved_bytes = max(reserved)


def summarise(record: Record, meter: Meter, tracker: StorageTracker, sampler: NvmlSampler | None,
              cuda: bool, rss0: int, analytic: dict[str, int] | None = None, first: Meter | None = None) -> None:
    """The record's peaks: the worst steady-state phase, its categories (on cuda plus what
    the tracker did not see, and the allocator's cache), the first step's phases apart,
    NVML's peaks and context, RSS on cpu. A sim's ``analytic`` non-tensor bytes are added to
    every phase as temporaries, and named."""
    m = record.measured
    phases = meter.phases
    if analytic:
        extra = sum(analytic.values())
        for p in list(phases.values()) + list(first.phases.values() if first else []):
            p.peak_allocated_bytes += extra
            p.categories[Category.TEMPORARIES.value] = p.categories.get(Category.TEMPORARIES.value, 0) + extra
        m.analytic = dict(analytic)
    m.phases = phases
    if first is not None and first.phases:
        m.first_step = first.phases
    if cuda and record.status is Status.OOM:
        m.peak_allocated_bytes = int(torch.cuda.max_memory_allocated())
        m.peak_reserved_bytes = int(torch.cuda.max_memory_reserved())
    if phases:
        peak_phase = max(phases, key=lambda p: phases[p].peak_allocated_bytes)
        top = phases[peak_phase]
        m.peak_phase = peak_phase
        m.peak_allocated_bytes = max(m.peak_allocated_bytes or 0, top.peak_allocated_bytes)
        reserved = [p.peak_reserved_bytes for p in phases.values() if p.peak_reserved_bytes is not None]
        if reserved:
            m.peak_reserved_bytes = max(reserved)
        categories = {c.value: 0 for c in Category}
        for k, v in top.categories.items():
            categories[k] = categories.get(k, 0) + v
        if cuda:
            categories[Category.TEMPORARIES.value] += top.untracked_bytes or 0
            categories[Category.ALLOCATOR.value] = int(top.peak_reserved_bytes - top.peak_allocated_bytes)
        m.categories = categories
    if sampler is not None and sampler.available:
        m.nvml_timeline = [list(p) for p in sampler.timeline()]
        dev, proc = sampler.peak()
        m.nvml_peak_used_bytes, m.nvml_peak_process_bytes = dev, proc
        if dev is not None and m.peak_reserved_bytes is not None and m.categories is not None:
            m.categories[Category.CONTEXT.value] = max(0, int(dev - (m.nvml_idle_used_bytes or 0)
                                                             - m.peak_reserved_bytes))
    if record.backend == "cpu":
        m.rss_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m.rss_before_bytes = rss0
    res = tracker.results()
    m.tracked_live_storages_end = res.live_storages
    if res.timeline is not None:
        m.timeline = [list(p) for p in res.timeline]
        m.timeline_phases = [[p.name, p.start_event, p.end_event] for p in res.phases if p.start_event >= 0]
