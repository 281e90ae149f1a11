"""Run one case for real and measure it: warm-up, then N steps split into phases.

Backends (../shared/DESIGN.md): ``cuda`` (allocator peaks per phase + NVML thread),
``cpu`` (a real step; tracked live storage bytes + RSS) and ``sim`` (the same tracker
under FakeTensorMode: any model size, no memory, no compute). All produce one record.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import platform
import resource
import socket
import time
from typing import Dict, Optional

import torch

from estimator.categories import Category, Phase
from estimator.estimate import estimate
from estimator.modelspec import ModelSpec, load_model
from estimator.setup import Device, Setup

from profiler.measure.build import (SetupUnavailable, autocast_context, build_model, build_optimizer,
                    materialize_fake, synthetic_batch)
from profiler.measure.nvml import NvmlSampler
from profiler.record import SCHEMA_VERSION, case_key
from profiler.measure.tracker import StorageTracker

BACKENDS = ("cuda", "cpu", "sim")
#: torch.cuda.memory_stats() keys kept per phase (CUDACachingAllocator DeviceStats)
CUDA_STATS = ("num_alloc_retries", "num_ooms", "active_bytes.all.peak",
              "inactive_split_bytes.all.peak", "segment.all.peak", "requested_bytes.all.peak")


def backend_setup(setup: Setup, backend: str) -> Setup:
    """cpu and sim run with CPU semantics (dropout noise tensors, the for-loop optimizer)."""
    return setup.replace(device=Device.CUDA if backend == "cuda" else Device.CPU)


def make_case(model: str, setup: Setup, backend: str, steps: int, spec: Optional[ModelSpec] = None) -> dict:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    spec = spec or load_model(model)
    return {"model": model, "config_hash": spec.config_hash,
            "setup": backend_setup(setup, backend).to_dict(), "steps": steps, "backend": backend}


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "absent"
    return out


def device_info(backend: str) -> dict:
    if backend == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "total_memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    info = {"name": platform.processor() or platform.machine(), "cuda": None}
    try:
        import os
        info["total_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return info


def measure_cuda_context(sampler: NvmlSampler) -> dict:
    """NVML's device memory before and after this process initialises CUDA: the context
    (driver state, loaded modules) is the growth beyond what the allocator reserved.
    Call it before anything else in the process touches CUDA."""
    idle = sampler.used()[0] if sampler.available else None
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    if not sampler.available:
        return {"idle_used_bytes": None, "context_bytes": None, "process_used_bytes": None}
    used, proc = sampler.used()
    return {"idle_used_bytes": idle, "context_bytes": used - idle - torch.cuda.memory_reserved(),
            "process_used_bytes": proc}


class _Meter:
    """Measures one phase: tracker always; the CUDA allocator's peaks on cuda."""

    def __init__(self, tracker: StorageTracker, cuda: bool):
        self.tracker = tracker
        self.cuda = cuda
        self.phases: Dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, phase: Phase, default: Category):
        self.tracker.default_category = default
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with self.tracker.phase(phase.value) as rec:
            yield
        if self.cuda:
            torch.cuda.synchronize()
            alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        else:
            alloc, reserved = rec.peak_bytes, None
        prev = self.phases.get(phase.value)
        if prev is None or alloc > prev["peak_allocated_bytes"]:  # keep the worst step
            entry = {"peak_allocated_bytes": int(alloc), "peak_reserved_bytes": reserved,
                     "tracked_peak_bytes": int(rec.peak_bytes), "start_bytes": int(rec.start_bytes),
                     "end_bytes": int(self.tracker.current_bytes),
                     "categories": {k: int(v) for k, v in rec.peak_breakdown.items()}}
            if self.cuda:
                entry["untracked_bytes"] = max(0, int(alloc) - int(rec.peak_bytes))
                stats = torch.cuda.memory_stats()
                entry["memory_stats"] = {k: int(stats.get(k, 0)) for k in CUDA_STATS}
            self.phases[phase.value] = entry


def _kv_tensors(cache):
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def train_step(model, opt, ids, setup: Setup, device: str, measure) -> float:
    """One training step split into measured phases; returns its wall time in seconds.
    ``device`` may name an index (``cuda:1``)."""
    kind = device.split(":")[0]
    t0 = time.perf_counter()
    with measure(Phase.FORWARD, Category.ACTIVATIONS):
        with autocast_context(setup, kind):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
        del out
    with measure(Phase.BACKWARD, Category.ACTIVATIONS):
        loss.backward()
        del loss
    with measure(Phase.OPTIMIZER, Category.TEMPORARIES):
        opt.step()
    with measure(Phase.ZERO_GRAD, Category.TEMPORARIES):
        opt.zero_grad(set_to_none=True)
    if kind == "cuda":
        torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 6)


def _train_steps(model, spec, setup, device, steps, tracker, meter, timings):
    opt = build_optimizer(model, setup)
    tracker.watch_grads([p for p in model.parameters() if p.requires_grad])
    inner = getattr(opt, "inner", opt)
    tracker.watch_optimizer(inner)
    if inner is not opt:
        tracker.track(opt.masters, Category.OPTIMIZER_STATE)  # fp32 master weights
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda *_: setattr(tracker, "default_category", Category.LOGITS))
    ids = synthetic_batch(spec, setup, device)
    try:
        for step in range(steps + 1):  # step 0 is the warm-up (optimizer state, cuBLAS handles)
            measure = meter if step else _unmeasured(tracker)
            if step and device == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            timings["warmup_s" if step == 0 else "step_s"].append(train_step(model, opt, ids, setup, device, measure))
    finally:
        hook.remove()
        tracker.remove_hooks()


def _infer_steps(model, spec, setup, device, steps, tracker, meter, timings):
    ids = synthetic_batch(spec, setup, device)
    with torch.no_grad():
        for step in range(steps + 1):
            measure = meter if step else _unmeasured(tracker)
            t0 = time.perf_counter()
            with measure(Phase.PREFILL, Category.ACTIVATIONS):
                with autocast_context(setup, device):
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                del out
            tracker.track(list(_kv_tensors(cache)), Category.KV_CACHE)
            for _ in range(setup.new_tokens):
                with measure(Phase.DECODE, Category.ACTIVATIONS):
                    with autocast_context(setup, device):
                        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    nxt = out.logits[:, -1:].argmax(-1)
                    del out
                tracker.track(list(_kv_tensors(cache)), Category.KV_CACHE)
            del cache, nxt
            if device == "cuda":
                torch.cuda.synchronize()
            timings["warmup_s" if step == 0 else "step_s"].append(round(time.perf_counter() - t0, 6))


def _unmeasured(tracker):
    @contextlib.contextmanager
    def measure(phase, default):
        tracker.default_category = default
        yield
    return measure


def run_case(model: str, setup: Setup, backend: str, steps: int = 2, timeline: bool = False,
             tracker: Optional[StorageTracker] = None, cuda_context: Optional[dict] = None) -> dict:
    """Measure one case; returns a record (status ok, oom or error — never raises for those).

    ``tracker``: the caller's tracker (a persistent worker keeps it to check, after the case,
    that every storage the case made is gone). ``cuda_context``: NVML figures a persistent
    worker measured once when it initialised CUDA (``idle_used_bytes``, ``context_bytes``,
    ``process_used_bytes``); without it this process measures them now, before and after
    its own CUDA initialisation."""
    spec = load_model(model)
    case = make_case(model, setup, backend, steps, spec)
    setup = Setup.from_dict(case["setup"])
    record = {"schema": SCHEMA_VERSION, "case": case, "case_key": case_key(case), "backend": backend,
              "status": "ok", "message": "", "versions": versions(), "host": socket.gethostname(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "predicted": estimate(spec, setup).to_dict()}
    measured: dict = {}
    record["measured"] = measured
    timings: dict = {"build_s": None, "warmup_s": [], "step_s": []}
    record["timings"] = timings
    cuda = backend == "cuda"
    sampler = None
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("backend cuda needs a CUDA GPU, and torch sees none here; use --backend cpu or sim")
        sampler = NvmlSampler()
        if cuda_context is None:
            cuda_context = measure_cuda_context(sampler)
        if sampler.available:
            measured["nvml_idle_used_bytes"] = cuda_context["idle_used_bytes"]
            measured["nvml_context_bytes"] = cuda_context["context_bytes"]
            measured["nvml_process_used_bytes"] = cuda_context["process_used_bytes"]
        else:
            record["message"] = sampler.message
    record["device"] = device_info(backend)
    if sampler and sampler.available:
        record["device"]["driver"] = sampler.driver
    tracker = tracker if tracker is not None else StorageTracker(record_timeline=timeline)
    meter = _Meter(tracker, cuda)
    fake = None
    if backend == "sim":
        from torch._subclasses.fake_tensor import FakeTensorMode
        fake = FakeTensorMode(allow_non_fake_inputs=True)
    device = "cuda" if cuda else "cpu"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        if fake is not None:  # sim: build on meta (peft attaches adapters there), then fake CPU tensors
            model_obj = materialize_fake(build_model(spec, setup, "meta"), fake)
        else:
            model_obj = build_model(spec, setup, device)
        timings["build_s"] = round(time.perf_counter() - t0, 6)
        tracker.track(model_obj, Category.WEIGHTS)
        if sampler:
            sampler.start()
        with (fake or contextlib.nullcontext()), tracker:
            runner = _train_steps if setup.training else _infer_steps
            runner(model_obj, spec, setup, device, steps, tracker, meter, timings)
    except SetupUnavailable as exc:
        record["status"], record["message"] = "error", str(exc)
    except torch.OutOfMemoryError as exc:
        record["status"], record["message"] = "oom", str(exc).splitlines()[0][:300]
    except Exception as exc:  # a data point too: the case's failure is recorded, the sweep goes on
        text = str(exc)
        # cuBLAS/cuDNN allocation failures arrive as plain RuntimeErrors
        oom = "out of memory" in text.lower() or "ALLOC_FAILED" in text
        record["status"] = "oom" if oom else "error"
        record["message"] = f"{type(exc).__name__}: {text[:300]}"
    finally:
        if sampler:
            sampler.stop()
    try:
        _summarise(record, meter, tracker, sampler, cuda, rss0)
    except Exception as exc:  # a summary bug must not lose the status of the run
        record["message"] = (record["message"] + f"; summary failed: {type(exc).__name__}: {exc}").strip("; ")
    return record


def _summarise(record, meter, tracker, sampler, cuda, rss0) -> None:
    measured = record["measured"]
    phases = meter.phases
    measured["phases"] = phases
    if cuda and record["status"] == "oom":
        measured["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        measured["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    if phases:
        peak_phase = max(phases, key=lambda p: phases[p]["peak_allocated_bytes"])
        top = phases[peak_phase]
        measured["peak_phase"] = peak_phase
        measured["peak_allocated_bytes"] = max(measured.get("peak_allocated_bytes", 0), top["peak_allocated_bytes"])
        reserved = [p["peak_reserved_bytes"] for p in phases.values() if p["peak_reserved_bytes"] is not None]
        if reserved:
            measured["peak_reserved_bytes"] = max(reserved)
        categories = {c.value: 0 for c in Category}
        for k, v in top["categories"].items():
            categories[k] = categories.get(k, 0) + v
        if cuda:
            categories[Category.TEMPORARIES.value] += top.get("untracked_bytes", 0)
            categories[Category.ALLOCATOR.value] = int(top["peak_reserved_bytes"] - top["peak_allocated_bytes"])
        measured["categories"] = categories
    if sampler and sampler.available:
        measured["nvml_timeline"] = sampler.timeline()
        dev, proc = sampler.peak()
        measured["nvml_peak_used_bytes"] = dev
        measured["nvml_peak_process_bytes"] = proc
        if dev is not None and "peak_reserved_bytes" in measured and "categories" in measured:
            measured["categories"][Category.CONTEXT.value] = max(0, int(
                dev - measured.get("nvml_idle_used_bytes", 0) - measured["peak_reserved_bytes"]))
    if record["backend"] == "cpu":
        measured["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        measured["rss_before_bytes"] = rss0
    res = tracker.results()
    measured["tracked_live_storages_end"] = res.live_storages
    if res.timeline is not None:
        measured["timeline"] = res.timeline
