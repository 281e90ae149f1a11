"""Run one case on one device and measure it: warm-up, then N steps split into phases.

Backends: ``cuda`` (allocator peaks per phase + an NVML thread), ``cpu`` (a real step;
tracked live storage bytes + RSS) and ``sim`` (the same tracker under FakeTensorMode:
any model size, no memory, no compute). All produce one :class:`~profiler.record.Record`
through :func:`profiler.measure.steps.measure_run`, the skeleton the ranks share.
"""
from __future__ import annotations

import os
import platform

import torch

from estimator.archs import arch_of
from estimator.categories import Category
from estimator.estimate import NoFormula, NotModelled, estimate
from estimator.gpus import gpu_named
from estimator.modelspec import ModelSpec, load_model
from estimator.setup import Device, Setup
from profiler.measure.build import build_model, materialize_fake
from profiler.measure.harness import harness_setup
from profiler.measure.nvml import NvmlSampler
from profiler.measure.quant import quant_state_tensors, visible_kernels
from profiler.measure.sim import CUDA_BLOCK_BYTES, analytic_bytes, cuda_semantics, never_packed
from profiler.measure.steps import Model, measure_run
from profiler.measure.tracker import StorageTracker
from profiler.record import Case, Prediction, Record, new_record

BACKENDS = ("cuda", "cpu", "sim")


def backend_setup(setup: Setup, backend: str) -> Setup:
    """The semantics a backend runs: cuda's and cpu's are their own; sim emulates either,
    as the setup's device says (CUDA unless told otherwise: profiler/measure/sim.py)."""
    if backend == "sim":
        return setup
    return setup.replace(device=Device.CUDA if backend == "cuda" else Device.CPU)


def sim_contexts(setup: Setup, tracker: StorageTracker) -> tuple[list, dict[str, int]]:
    """What a sim run enters around its steps, and the non-tensor bytes it adds: CPU
    semantics need only the packed-sequence fix; CUDA semantics the emulation too, and
    the tracker counts 512-byte blocks."""
    if setup.device is not Device.CUDA:
        return [never_packed(), visible_kernels(setup, "cpu")], {}
    tracker.round_bytes = CUDA_BLOCK_BYTES
    return [never_packed(), cuda_semantics(setup), visible_kernels(setup, "cuda")], analytic_bytes(setup)


def make_case(spec: ModelSpec, setup: Setup, backend: str, steps: int, nproc: int | None = None,
              model: str | None = None) -> Case:
    """The case a run records (its setup as the backend runs it); ``model`` names it when
    the user named it otherwise than ``spec.name`` (a path)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return Case(model=model or spec.name, config_hash=spec.config_hash,
                setup=backend_setup(setup, backend).to_dict(), steps=steps, backend=backend, nproc=nproc)


def prediction(spec: ModelSpec, setup: Setup, device_name: str | None = None,
               harness: bool = True, backend: str = "cuda") -> Prediction | None:
    """The estimate put beside a measurement (of this harness's loop unless ``harness`` is
    off, on the GPU named ``device_name`` when it is a preset); ``None`` for a model type the
    estimator has no formula for, or whose memory terms are not all written (NotModelled): it is
    measured all the same, which is how such a model is sized."""
    try:
        run = harness_setup(setup, backend) if harness else setup
        return Prediction(**estimate(spec, run, gpu_named(device_name)).to_dict())
    except (NoFormula, NotModelled):
        return None


def device_info(backend: str) -> dict:
    if backend == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "total_memory_bytes": int(props.total_memory),
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    info = {"name": platform.processor() or platform.machine(), "cuda": None}
    try:
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


def run_case(model: str, setup: Setup, backend: str, steps: int = 2, timeline: bool = False,
             tracker: StorageTracker | None = None, cuda_context: dict | None = None,
             spec: ModelSpec | None = None) -> Record:
    """Measure one case; returns its record (status ok, oom or error — never raises for those).

    ``tracker``: the caller's tracker (a persistent worker keeps it to check, after the case,
    that every storage the case made is gone). ``cuda_context``: NVML figures a persistent
    worker measured once when it initialised CUDA (``idle_used_bytes``, ``context_bytes``,
    ``process_used_bytes``); without it this process measures them now, before and after
    its own CUDA initialisation. ``spec``: the model, when the caller has loaded it.

        >>> from estimator.setup import Setup
        >>> record = run_case("smollm2-135m", Setup(mode="lora", seq=128, device="cpu"), "sim", steps=1)
        >>> record.ok, record.measured.peak_phase
        (True, 'backward')
        >>> err = record.predicted.allocated_bytes / record.measured.peak_allocated_bytes - 1
        >>> abs(err) < 0.01
        True
    """
    spec = spec or load_model(model)
    setup = backend_setup(setup, backend)
    device = torch.cuda.get_device_name(0) if backend == "cuda" and torch.cuda.is_available() else None
    record = new_record(make_case(spec, setup, backend, steps, model=model),
                        predicted=prediction(spec, setup, device, backend=backend))
    if record.predicted is None:
        gap = "" if not spec.has_formula else arch_of(spec).memory_gap(spec, setup)
        record.note(f"no estimate beside it: {gap}" if gap else
                    f"no estimate beside it: model_type {spec.model_type!r} has no formula (estimator/archs)")
    cuda = backend == "cuda"
    sampler = None
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("backend cuda needs a CUDA GPU, and torch sees none here; use --backend cpu or sim")
        sampler = NvmlSampler()
        if cuda_context is None:
            cuda_context = measure_cuda_context(sampler)
        if sampler.available:
            record.measured.nvml_idle_used_bytes = cuda_context["idle_used_bytes"]
            record.measured.nvml_context_bytes = cuda_context["context_bytes"]
            record.measured.nvml_process_used_bytes = cuda_context["process_used_bytes"]
        else:
            record.message = sampler.message
    record.device = device_info(backend)
    if sampler is not None and sampler.available:
        record.device["driver"] = sampler.driver

    def build(tracker: StorageTracker) -> Model:
        analytic: dict[str, int] = {}
        if backend == "sim":  # build on meta (peft attaches adapters there), then fake CPU tensors
            from torch._subclasses.fake_tensor import FakeTensorMode
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            contexts, analytic = sim_contexts(setup, tracker)
            model_obj = materialize_fake(build_model(spec, setup, "meta"), fake)
            contexts.insert(0, fake)
        else:
            model_obj = build_model(spec, setup, "cuda" if cuda else "cpu")
            contexts = [] if cuda else [visible_kernels(setup, "cpu")]  # bitsandbytes' kernels as torch ops
        tracker.track(model_obj, Category.WEIGHTS)
        tracker.track(quant_state_tensors(model_obj), Category.WEIGHTS)  # no parameters (quant.py)
        return Model(forward=model_obj, inner=model_obj, device="cuda" if cuda else "cpu", contexts=contexts,
                     analytic=analytic)

    return measure_run(record, spec, setup, steps, build, cuda=cuda, tracker=tracker, sampler=sampler,
                       timeline=timeline)
