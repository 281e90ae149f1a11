"""Measure a training case on N ranks: under ``torchrun`` one record per rank, or rank 0 of
many simulated in-process.

:func:`run_distributed` launches PyTorch's own launcher
(``python -P -m torch.distributed.run --standalone --nproc_per_node N --no-python python -P -m
profiler.measure.dist_worker``) under a keeper (:mod:`profiler.measure.launcher`) that owns the
temporary folder the ranks write to; no rank, torchrun or folder outlives an interrupted,
terminated or killed run (each child has a parent-death signal). Each rank
(:func:`rank_record`) builds the model like the single-device harness, wraps it in
``DistributedDataParallel`` (sharding ddp), FSDP2 ``fully_shard`` per decoder layer
and then the root (sharding fsdp; zero3 is measured as fsdp) or FSDP1 as accelerate runs
it (fsdp1, fsdp1-shard-grad-op: :func:`wrap_fsdp1`), and measures warm-up plus N
steps phase by phase with the harness's meter. On CPU the ranks talk over gloo, on CUDA
over NCCL. Rank 0 gathers the records; a failing or hanging rank becomes a ``status:
error`` record, never a hang (a subprocess timeout and a collective timeout).
:func:`run_sim_rank0` runs rank 0 of N under a fake process group on fake tensors.

What the tracker counts per rank: local tensor storages only. FSDP2 parameters are
DTensors, whose local shard the tracker sees through the wrapper-subclass path. FSDP2
all-gathers into buffers whose storage it resizes in place, which no dispatched op
reports, and gloo copies tensors inside its collectives and frees the copies on its own
threads; :func:`fsdp_storage_hooks` accounts for both.
"""
from __future__ import annotations

import contextlib
import gc
import json
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from estimator.categories import Category
from estimator.modelspec import ModelSpec, load_model
from estimator.setup import Mode, Setup, Sharding
from profiler.measure.build import build_model, build_optimizer, materialize_fake
from profiler.measure.launcher import RECORDS_NAME
from profiler.measure.procs import STOP_GRACE_S, python_command, signals_held, signals_raise, start_group, stop_group
from profiler.measure.quant import quant_state_tensors
from profiler.measure.run import backend_setup, device_info, make_case, prediction, sim_contexts
from profiler.measure.steps import Model, measure_run
from profiler.measure.tracker import StorageTracker
from profiler.record import Record, Status, append_record, check_record, new_record

#: shardings this module can run for real (zero1/zero2 need DeepSpeed or ZeroRedundancyOptimizer)
MEASURED = (Sharding.DDP, Sharding.FSDP, Sharding.ZERO3, Sharding.FSDP1, Sharding.FSDP1_GRAD_OP)
FSDP1 = (Sharding.FSDP1, Sharding.FSDP1_GRAD_OP)
DIST_BACKENDS = ("cpu", "cuda")
#: Seconds the keeper may take to go once told: two stages of STOP_GRACE_S for torchrun
#: (SIGTERM, then SIGKILL) and one more to relay the records and remove its folder.
KEEPER_GRACE_S = 3 * STOP_GRACE_S


def distributed_setup(setup: Setup, nproc: int) -> Setup:
    """The per-rank setup of an N-rank case (world_size N); zero3 is measured as FSDP2."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if not setup.training:
        raise ValueError("distributed runs measure training; inference runs on one device here")
    sharding = setup.sharding
    if sharding is Sharding.NONE:
        raise ValueError("a distributed run needs a sharding: ddp, fsdp or zero3 (--sharding)")
    if sharding not in MEASURED:
        raise ValueError(f"sharding {sharding} cannot be measured here (it needs DeepSpeed); "
                         f"measure one of: ddp, fsdp, zero3; the estimator still models it")
    return setup.replace(world_size=nproc, sharding=sharding)


def decoder_layers(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers (``model.layers``, GPT-2's ``transformer.h``, peft-wrapped too)."""
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == spec.num_layers:
            return module
    raise ValueError(f"cannot find the {spec.num_layers} decoder layers of {spec.name} to shard")


@contextlib.contextmanager
def fsdp_storage_hooks(tracker: StorageTracker, gathered: Category = Category.TEMPORARIES):
    """Show the tracker FSDP2's memory as a rank's allocator sees it; install/remove in a pair.

    - FSDP2 keeps each unsharded parameter in ``FSDPParam.all_gather_outputs``, whose storage
      ``alloc_storage`` grows before an all-gather and ``free_storage`` shrinks to 0 on reshard
      (``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``); ``UntypedStorage.resize_`` is no
      dispatched op, so the tracker is told of each resize here. The gathered parameters are
      tagged ``gathered`` (the estimator counts them as temporaries).
    - The sharded gradients FSDP2 assigns after its reduce-scatter are tagged gradients.
    - The collectives themselves (``DefaultAllGather`` / ``DefaultReduceScatter`` in
      ``_fsdp_collectives.py``) run untracked: gloo copies its inputs on the calling thread and
      frees the copies on its worker threads at times no two runs share, while NCCL works in
      place. FSDP2's own buffers (all-gather and reduce-scatter inputs and outputs) are
      allocated outside the collectives and stay counted.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives, _fsdp_param, _fsdp_param_group

    FSDPParam, FSDPParamGroup = _fsdp_param.FSDPParam, _fsdp_param_group.FSDPParamGroup
    patched = [(_fsdp_param, "alloc_storage"), (_fsdp_param, "free_storage"),
               (_fsdp_param_group, "alloc_storage"), (FSDPParam, "init_all_gather_outputs"),
               (FSDPParamGroup, "post_backward")]
    collectives = [getattr(_fsdp_collectives, name) for name in
                   ("DefaultAllGather", "DefaultReduceScatter", "ProcessGroupAllocAllGather",
                    "ProcessGroupAllocReduceScatter") if hasattr(_fsdp_collectives, name)]
    patched += [(cls, "__call__") for cls in collectives]
    originals = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
                 for owner, name in patched]
    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage
    init_outputs, post_backward = FSDPParam.init_all_gather_outputs, FSDPParamGroup.post_backward

    def alloc_storage(tensor):
        alloc(tensor)
        tracker.track(tensor, gathered)

    def free_storage(tensor):
        free(tensor)
        tracker.track(tensor)  # resized to 0: the tracker drops its bytes

    def init_all_gather_outputs(self, *args, **kwargs):
        init_outputs(self, *args, **kwargs)
        tracker.track(self.all_gather_outputs, gathered)

    def post_backward_tagged(self, *args, **kwargs):
        out = post_backward(self, *args, **kwargs)
        tracker.track([p.sharded_param.grad for p in self.fsdp_params], Category.GRADIENTS)
        return out

    _fsdp_param.alloc_storage = alloc_storage
    _fsdp_param.free_storage = free_storage
    _fsdp_param_group.alloc_storage = alloc_storage
    FSDPParam.init_all_gather_outputs = init_all_gather_outputs
    FSDPParamGroup.post_backward = post_backward_tagged
    for cls in collectives:
        cls.__call__ = _untracked(cls.__dict__["__call__"])
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def _untracked(call):
    """``call`` (a collective: a function, or a method with its instance first) run outside
    the tracker's dispatch mode; a synchronous one (no work handle returned) waits until
    gloo's worker thread has let go of its tensors (:func:`_settle`)."""
    from torch.utils._python_dispatch import _disable_current_modes

    def run(*args, **kwargs):
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        before = _use_counts(tensors)
        with _disable_current_modes():
            work = call(*args, **kwargs)
        if work is None:
            _settle(tensors, before)
        return work
    return run


def _use_counts(tensors) -> list:
    return [(t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)) for t in tensors]


def _settle(tensors, before, limit_s: float = 1.0) -> None:
    """Wait (at most ``limit_s``) until no collective worker holds ``tensors`` any more.

    ProcessGroupGloo's worker thread completes a work item, wakes the caller, and only then
    drops its references (``ProcessGroupGloo::runLoop``); were the caller to drop the last
    Python reference first, the storage would die on the worker thread at an unpredictable
    point of the step. Waiting here keeps every free on the thread that measures.
    """
    deadline = time.perf_counter() + limit_s
    while _use_counts(tensors) > before and time.perf_counter() < deadline:
        time.sleep(0.0002)


def wrap(model: torch.nn.Module, spec: ModelSpec, setup: Setup, device: str, world: int, mesh=None):
    """DDP for ddp; FSDP2 ``fully_shard`` on every decoder layer, then the root, for fsdp/zero3
    (over ``mesh``, by default a 1-D mesh of all ranks; build it outside any FakeTensorMode);
    FSDP1 as accelerate and the Trainer configure it for fsdp1 (:func:`wrap_fsdp1`)."""
    if setup.sharding in FSDP1:
        return wrap_fsdp1(model, spec, setup, device)
    if setup.sharding is Sharding.DDP:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        return DDP(model, device_ids=device_ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if mesh is None:
        mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    for layer in decoder_layers(model, spec):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_fsdp1(model: torch.nn.Module, spec: ModelSpec, setup: Setup, device: str):
    """FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) the way ``accelerate launch``
    with the Trainer runs it: one FSDP unit per decoder layer (TRANSFORMER_BASED_WRAP on the
    model's ``_no_split_modules``), the root unit owning the rest; ``FULL_SHARD`` (fsdp1) or
    ``SHARD_GRAD_OP``; ``use_orig_params=True`` (transformers' TrainingArguments sets
    ``FSDP_USE_ORIG_PARAMS`` to "true" unless told otherwise); FSDP's defaults otherwise
    (``BACKWARD_PRE`` prefetch, no forward prefetch, ``limit_all_gathers``). A peft model gets
    peft's ``fsdp_auto_wrap_policy`` as the Trainer gives it (transformers trainer.py
    ``_fsdp_qlora_plugin_updates``): every leaf module with a trainable weight -- each
    adapter's lora_A and lora_B -- is a unit of its own, so no flat parameter mixes frozen
    and trainable parameters. ``--fsdp-wrap layers`` (``Setup.layer_units``) leaves that
    policy out: one unit per decoder layer, its frozen weights and adapters in one flat
    parameter (estimator/setup.py FsdpWrap)."""
    import functools

    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, _or_policy, lambda_auto_wrap_policy

    layer_cls = {type(decoder_layers(model, spec)[0])}
    policy = ModuleWrapPolicy(layer_cls)
    if setup.mode is not Mode.FULL and not setup.layer_units:
        def trainable_leaf(module: torch.nn.Module) -> bool:  # peft/utils/other.py lambda_policy_fn
            weight = getattr(module, "weight", None)
            return not list(module.children()) and weight is not None and weight.requires_grad
        policy = functools.partial(_or_policy, policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf), policy])
    strategy = ShardingStrategy.FULL_SHARD if setup.sharding is Sharding.FSDP1 else ShardingStrategy.SHARD_GRAD_OP
    return FSDP(model, auto_wrap_policy=policy, sharding_strategy=strategy, use_orig_params=True,
                backward_prefetch=BackwardPrefetch.BACKWARD_PRE, device_id=torch.device(device))


@contextlib.contextmanager
def fsdp1_storage_hooks(tracker: StorageTracker, gathered: Category = Category.TEMPORARIES):
    """FSDP1's memory as a rank's allocator sees it (the counterpart of
    :func:`fsdp_storage_hooks`): the unsharded flat parameter's storage is grown by
    ``_alloc_storage`` and shrunk to 0 by ``_free_storage`` (torch/distributed/utils.py, called
    from _flat_param.py ``alloc_unsharded_flat_param`` / ``_free_unsharded_flat_param``), which
    no dispatched op reports; the reduce-scattered gradient shards
    (``_runtime_utils._accumulate_sharded_grad``) are tagged gradients; the collectives
    (``all_gather_single``, ``reduce_scatter_single``) run untracked as under FSDP2."""
    import torch.distributed as dist
    from torch.distributed.fsdp import _flat_param, _runtime_utils

    names = [n for n in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                         "reduce_scatter_tensor") if hasattr(dist, n)]
    originals = [(_flat_param, "_alloc_storage"), (_flat_param, "_free_storage"),
                 (_runtime_utils, "_accumulate_sharded_grad")] + [(dist, n) for n in names]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
    alloc, free, accumulate = _flat_param._alloc_storage, _flat_param._free_storage, \
        _runtime_utils._accumulate_sharded_grad

    def alloc_storage(tensor, size):
        alloc(tensor, size)
        tracker.track(tensor, gathered)

    def free_storage(tensor):
        free(tensor)
        tracker.track(tensor)

    def accumulate_tagged(state, handle, sharded_grad):
        out = accumulate(state, handle, sharded_grad)
        tracker.track(handle.flat_param._saved_grad_shard, Category.GRADIENTS)
        return out

    _flat_param._alloc_storage, _flat_param._free_storage = alloc_storage, free_storage
    _runtime_utils._accumulate_sharded_grad = accumulate_tagged
    for name in names:
        setattr(dist, name, _untracked(getattr(dist, name)))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


class LocalShardOptimizer:
    """The optimizer of a simulated FSDP2 rank, stepping each DTensor parameter's local
    shard: the same storages and the same per-shard ops (torch.optim on a DTensor
    dispatches each op to its local tensor, DTensor._op_dispatcher), without DTensor's
    sharding propagation, which allocates nothing and took a third of a 70B sim's time
    (py-spy: ShardingPropagator on every foreach op, never cached)."""

    def __init__(self, model: torch.nn.Module, setup: Setup):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shards = [torch.nn.Parameter(_local(p), requires_grad=True) for p in self.params]
        holder = torch.nn.Module()
        holder.shards = torch.nn.ParameterList(self.shards)
        self.inner = build_optimizer(holder, setup)

    def step(self) -> None:
        for shard, p in zip(self.shards, self.params):
            shard.grad = None if p.grad is None else _local(p.grad)
        self.inner.step()
        for shard in self.shards:
            shard.grad = None  # the DTensor's .grad keeps the storage until zero_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class _Chunks(Sequence):
    """``torch.chunk(tensor, n, dim)`` padded with empty tensors to n, built on demand: a
    simulated rank 0 of N reads two of the N chunks (its own and the first), and making all
    N fake views cost a fifth of a 70B sim's time. The chunks it builds are the same views."""

    def __init__(self, tensor: torch.Tensor, n: int, dim: int):
        self.tensor, self.n, self.dim = tensor, n, dim
        self.size = -(-tensor.size(dim) // n) if n else 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.size
        if start >= self.tensor.size(self.dim):
            return self[0].new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.size, self.tensor.size(self.dim) - start))


@contextlib.contextmanager
def lazy_fsdp_chunks() -> Iterator[None]:
    """While sharding a simulated rank's model, FSDP2's ``_chunk_with_empty``
    (torch/distributed/fsdp/_fully_shard/_fsdp_common.py) returns :class:`_Chunks`."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param
    original = _fsdp_param._chunk_with_empty
    _fsdp_param._chunk_with_empty = _Chunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP keeps the model as .module


def _rank_record(spec: ModelSpec, model: str, setup: Setup, backend: str, steps: int, rank: int,
                 world: int) -> Record:
    """The record's frame, as a single-device run writes it, plus rank, world size and nproc."""
    case = make_case(spec, setup, backend, steps, nproc=world, model=model)
    return new_record(case, predicted=prediction(spec, backend_setup(setup, backend), backend=backend), rank=rank,
                      world_size=world, device=device_info(backend))


def _rebuild_ddp_buckets(wrapped, tracker: StorageTracker):
    """DDP rebuilds its gradient buckets once, in the order gradients arrived in the first
    backward (torch/nn/parallel/distributed.py::_pre_forward); do it before the first
    measured step, tagged as gradients, rather than inside the first measured forward."""
    def before_step(step: int) -> None:
        if step == 1 and hasattr(wrapped, "reducer"):
            tracker.default_category = Category.GRADIENTS
            wrapped.reducer._rebuild_buckets()
    return before_step


def rank_record(model: str, setup: Setup, backend: str, steps: int, rank: int, world: int,
                local_rank: int = 0) -> Record:
    """Measure this rank (its process group already initialised) and return its record;
    a failing case is a record with status oom or error, never an exception."""
    spec = load_model(model)
    setup = distributed_setup(setup, world)
    record = _rank_record(spec, model, setup, backend, steps, rank, world)
    setup = backend_setup(setup, backend)
    cuda = backend == "cuda"
    device = f"cuda:{local_rank}" if cuda else "cpu"

    def build(tracker: StorageTracker) -> Model:
        model_obj = build_model(spec, setup, device)
        if setup.sharding is Sharding.DDP:
            tracker.track(model_obj, Category.WEIGHTS)
            tracker.track(quant_state_tensors(model_obj), Category.WEIGHTS)
            with tracker:  # the Reducer allocates its gradient buckets in DDP's constructor
                tracker.default_category = Category.GRADIENTS
                wrapped = wrap(model_obj, spec, setup, device, world)
            return Model(wrapped, _inner(wrapped), device, before_step=_rebuild_ddp_buckets(wrapped, tracker))
        wrapped = wrap(model_obj, spec, setup, device, world)
        gc.collect()  # the unsharded parameters fully_shard replaced
        tracker.track(wrapped, Category.WEIGHTS)  # this rank's local shards
        tracker.track(quant_state_tensors(wrapped), Category.WEIGHTS)  # bitsandbytes' state: whole on every rank
        hooks = fsdp1_storage_hooks if setup.sharding in FSDP1 else fsdp_storage_hooks
        return Model(wrapped, _inner(wrapped), device, contexts=[hooks(tracker)])

    return measure_run(record, spec, setup, steps, build, cuda=cuda)


def run_sim_rank0(model: str, setup: Setup, nproc: int, steps: int = 1) -> Record:
    """Rank 0 of ``nproc`` simulated in this process: FSDP2 over a fake process group
    (``torch.testing._internal.distributed.fake_pg``: collectives that move nothing) on fake
    tensors (``FakeTensorMode``: shapes, no memory, no compute), so a 70B model on 64 ranks
    takes seconds. FSDP2's code runs for real -- sharding, all-gather buffers, prefetching,
    reduce-scatter inputs -- and the tracker counts rank 0's bytes as on the cpu backend.
    Returns one record (backend sim); a failing case is a record with status error.
    DDP and FSDP1 are not simulated (DDP's Reducer allocates real buckets in C++, outside fake
    mode; FSDP1 is measured on real cpu ranks instead)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    setup = distributed_setup(setup, nproc)
    if setup.sharding is Sharding.DDP or setup.sharding in FSDP1:
        raise ValueError(f"sim runs FSDP2 (sharding fsdp or zero3); measure {setup.sharding} with backend cpu "
                         f"or cuda")
    if dist.is_initialized():
        raise ValueError("a process group is already initialised in this process; "
                         "run_sim_rank0 needs its own (fake) one: call it from a fresh process")
    spec = load_model(model)
    record = _rank_record(spec, model, setup, "sim", steps, 0, nproc)
    record.simulated = f"rank 0 of {nproc} (fake process group, fake tensors)"
    setup = backend_setup(setup, "sim")
    fake = FakeTensorMode(allow_non_fake_inputs=True)

    def build(tracker: StorageTracker) -> Model:
        contexts, analytic = sim_contexts(setup, tracker)
        model_obj = materialize_fake(build_model(spec, setup, "meta"), fake)
        mesh = init_device_mesh("cpu", (nproc,))  # outside the fake mode: a real rank table
        with fake, lazy_fsdp_chunks():
            wrapped = wrap(model_obj, spec, setup, "cpu", nproc, mesh)
        gc.collect()
        tracker.track(wrapped, Category.WEIGHTS)
        return Model(wrapped, _inner(wrapped), "cpu", contexts=[fake, *contexts, fsdp_storage_hooks(tracker)],
                     analytic=analytic, make_optimizer=LocalShardOptimizer)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    try:
        return measure_run(record, spec, setup, steps, build, cuda=False)
    finally:
        dist.destroy_process_group()


def error_record(model: str, setup: Setup, backend: str, steps: int, rank: int, nproc: int,
                 message: str) -> Record:
    """The record of a rank that left none (it crashed, or the launcher was stopped)."""
    spec = load_model(model)
    record = _rank_record(spec, model, distributed_setup(setup, nproc), backend, steps, rank, nproc)
    record.fail(Status.ERROR, message[:600])
    return record


def run_distributed(model: str, setup: Setup, backend: str = "cpu", steps: int = 1, nproc: int = 2,
                    out: str | Path | None = None, timeout_s: float = 600.0,
                    _crash_rank: int | None = None) -> list[Record]:
    """Run ``setup`` on ``nproc`` ranks under torchrun; one record per rank, rank order.

    Records are appended to ``out`` (JSONL) when given. A rank that crashed, or a launch
    stopped after ``timeout_s`` seconds (the process group is killed), yields a status
    ``error`` record naming the cause; collectives time out after ``timeout_s`` too, so a
    rank waiting on a dead peer gives up instead of hanging. ``_crash_rank`` makes that rank
    exit abruptly before measuring (for tests of the failure path).
    """
    if backend not in DIST_BACKENDS:
        raise ValueError(f"distributed backend {backend!r} is not one of: {', '.join(DIST_BACKENDS)} "
                         f"(sim runs rank 0 only: run_sim_rank0)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout_s!r}")
    ranked = distributed_setup(setup, nproc)
    load_model(model)  # an unknown model is a ValueError here, not nproc crashed ranks
    if backend == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"{nproc} ranks on cuda need {nproc} GPUs; torch sees {torch.cuda.device_count()}")
    request = {"model": str(model), "setup": ranked.to_dict(), "backend": backend, "steps": steps,
               "timeout_s": float(timeout_s)}
    if _crash_rank is not None:
        request["crash_rank"] = int(_crash_rank)
    # the keeper (profiler/measure/launcher.py) owns torchrun and the temporary folder; it
    # gets SIGTERM when this process dies, however it dies, and cleans up then too
    proc = start_group(python_command("profiler.measure.launcher", json.dumps(request, sort_keys=True), str(nproc)),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with signals_raise():  # SIGTERM, SIGHUP: the finally below runs, as for Ctrl-C
            try:
                relayed, err = proc.communicate(timeout=timeout_s + 60)  # + start-up: imports, rendezvous
                cause = ""
            except subprocess.TimeoutExpired:
                relayed, err = stop_group(proc, KEEPER_GRACE_S)
                cause = f"stopped after {timeout_s + 60:.0f} s (timeout)"
    finally:
        if proc.poll() is None:  # interrupted: the keeper stops torchrun and removes its folder
            with signals_held():
                stop_group(proc, KEEPER_GRACE_S)
    launch = _relayed(relayed or "")
    if not cause and launch.get("returncode"):
        cause = f"torchrun exited with code {launch['returncode']}"
    records = _collect(launch.get("files") or {}, nproc)
    exits, root = _failures(err or "")
    out_records = []
    for rank in range(nproc):
        record = records.get(rank)
        if record is None:
            why = exits.get(rank) or cause or "no record"
            if root and root[0] != rank:
                why += f"; first failure: rank {root[0]}, {root[1]}"
            elif not exits:
                tail = _error_tail(err or "")
                why += f"; {tail}" if tail else ""
            record = error_record(model, setup, backend, steps, rank, nproc, f"rank {rank} left no record ({why})")
        out_records.append(record)
    if out is not None:
        for record in out_records:
            append_record(out, record)
    return out_records


def _relayed(stdout: str) -> dict:
    """The keeper's last line: torchrun's exit code and the files the ranks left."""
    for line in reversed(stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def _collect(files: dict[str, str], nproc: int) -> dict[int, Record]:
    """Records by rank: rank 0's gathered file, else each rank's own file."""
    found: dict[int, Record] = {}
    for name in [RECORDS_NAME] + [f"{RECORDS_NAME}.rank{r}" for r in range(nproc)]:
        for line in str(files.get(name, "")).splitlines():
            try:
                record = check_record(json.loads(line), name)
            except ValueError:  # JSONDecodeError and RecordError: a torn or foreign line
                continue
            if record.rank is not None:
                found.setdefault(record.rank, record)
    return found


_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*([^\n]*?)\s*(?:\(pid[^)]*\))?\s*(\(\w+\))?\s*\n")


def _failures(stderr: str):
    """torchrun's failure summary (torch/distributed/elastic/multiprocessing/errors): each
    failed rank's exit code, and the root cause (the first rank that failed)."""
    exits = {}
    for match in _FAILURE.finditer(stderr):
        code = f"exit code {match.group(2).strip()}" + (f" {match.group(3)}" if match.group(3) else "")
        exits[int(match.group(1))] = code
    root = None
    _, sep, tail = stderr.partition("Root Cause")
    if sep:
        found = _FAILURE.search(tail)
        if found:
            root = (int(found.group(1)), exits[int(found.group(1))])
    return exits, root


def _error_tail(stderr: str) -> str:
    """The last error line the ranks printed (a traceback's last line)."""
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""
