"""Live tensor-storage byte tracker (a ``TorchDispatchMode``).

While a :class:`StorageTracker` is active, every op output whose untyped storage
has not been seen before is registered with ``storage.nbytes()`` under a tag (a
:class:`~estimator.categories.Category`), and unregistered by a weakref finalizer
when the storage object dies -- the scheme of PyTorch's own
``torch/distributed/_tools/mem_tracker.py`` (``_WeakRefInfo``), minus its
per-op module bookkeeping and snapshot deep copies.

Storage identity
    ``Tensor.untyped_storage()`` returns the *same* Python object for every tensor
    that shares a ``StorageImpl`` (views included): PyTorch preserves the storage's
    PyObject for as long as the ``StorageImpl`` lives. So ``id(storage)`` is a
    stable key, views are counted once, and a weakref callback on the storage
    object fires exactly when the last tensor using it dies. The callback runs
    before the object's memory is released, so a new storage can never reuse an
    ``id`` while its stale record is still registered. ``data_ptr()`` would *not*
    do as a key: every FakeTensor storage is a meta storage with ``data_ptr() == 0``.

Works on real tensors and under ``FakeTensorMode``. Enter the tracker inside the
fake mode by convention; in torch 2.13 the order does not actually matter, because
``FakeTensorMode`` is an "infra" mode that always dispatches below user modes, so
the tracker sees FakeTensor outputs either way (including fake dispatch-cache hits).
Tensors that exist before the tracker is entered (weights built under the fake mode,
``fake_mode.from_tensor`` conversions) are invisible until passed to :meth:`track`.

Usage::

    tracker = StorageTracker()
    tracker.track(model, Category.WEIGHTS)           # pre-existing params/buffers
    with tracker:
        with tracker.phase(Phase.FORWARD):
            loss = model(x).sum()
        tracker.default_category = Category.TEMPORARIES
        with tracker.phase(Phase.BACKWARD):
            loss.backward()
        tracker.track([p.grad for p in model.parameters()], Category.GRADIENTS)
        ...
    res = tracker.results()                           # plain data, int bytes
"""
from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from estimator.categories import Category

__all__ = ["StorageTracker", "PhaseRecord", "TrackerResults", "DEFAULT_MAX_TIMELINE_POINTS"]

#: Upper bound on the number of timeline samples kept (pairs are merged beyond it).
DEFAULT_MAX_TIMELINE_POINTS = 10_000

_Tensor = torch.Tensor
# Exact types whose ``untyped_storage()`` is a plain storage; everything else takes
# the slower path that also unwraps traceable wrapper subclasses (DTensor, ...).
_PLAIN_TENSOR_TYPES: set[type] = {torch.Tensor, torch.nn.Parameter}
try:  # FakeTensor is a plain (non-wrapper) subclass: its storage is a meta storage.
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor

    _PLAIN_TENSOR_TYPES.add(_FakeTensor)
except Exception:  # pragma: no cover - very old torch
    pass

_aten = torch.ops.aten
#: ops that call cuBLAS on CUDA (aten/src/ATen/native/cuda/Blas.cpp: mm, addmm, bmm, baddbmm,
#: addmv and their fused-epilogue forms). A handle's workspace is allocated through the
#: caching allocator at the first such call on a thread (aten/src/ATen/cuda/CublasHandlePool.cpp
#: ``getCUDABlasLtWorkspace``), after the op's output: the event log marks it there.
_BLAS_OPS = frozenset({_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.addmv, _aten.mv,
                       _aten._addmm_activation})


class _StorageRef(weakref.ref):
    """Weak reference to an ``UntypedStorage`` that is also its tracking record."""

    __slots__ = ("key", "nbytes", "tag")

    def __new__(cls, st, callback, key, nbytes, tag):  # noqa: D102
        self = weakref.ref.__new__(cls, st, callback)
        self.key = key
        self.nbytes = nbytes
        self.tag = tag
        return self

    def __init__(self, st, callback, key, nbytes, tag):  # noqa: D107
        super().__init__(st, callback)


@dataclass
class PhaseRecord:
    """What one ``tracker.phase(name)`` block saw (all sizes in bytes)."""

    name: str
    index: int
    """Order in which the phase was entered (0-based, over the tracker's life)."""
    start_bytes: int
    peak_bytes: int
    """Highest ``current_bytes`` while the phase was open (>= start and end)."""
    end_bytes: int = -1
    """-1 while the phase is still open."""
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    """Bytes per tag at the moment ``peak_bytes`` was first reached."""
    end_breakdown: dict[str, int] = field(default_factory=dict)
    start_event: int = -1
    """Timeline event index at entry and exit (with ``record_timeline``; -1 otherwise)."""
    end_event: int = -1

    @property
    def peak_delta(self) -> int:
        """Peak growth over the phase's start."""
        return self.peak_bytes - self.start_bytes


@dataclass
class TrackerResults:
    """Plain-data summary returned by :meth:`StorageTracker.results`."""

    current_bytes: int
    peak_bytes: int
    peak_breakdown: dict[str, int]
    """Bytes per tag at the moment of the global peak."""
    current_breakdown: dict[str, int]
    phases: list[PhaseRecord]
    live_storages: int
    n_allocs: int
    n_frees: int
    timeline: list[tuple[int, int]] | None = None
    """``(event_index, current_bytes)`` samples, or ``None`` when not recorded."""

    def phase(self, name: str) -> PhaseRecord:
        """The last recorded phase called ``name`` (``KeyError`` if none)."""
        name = str(name)
        for rec in reversed(self.phases):
            if rec.name == name:
                return rec
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _plain(d: dict) -> dict[str, int]:
    return {str(k): int(v) for k, v in d.items()}


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages, per tag, with peaks and phases.

    Args:
        default_category: tag for new storages nobody tagged; switch it at any
            time via the ``default_category`` attribute.
        record_timeline: keep ``(event_index, current_bytes)`` samples, one per
            allocation/free, merged pairwise (keeping the larger sample, so the
            peak survives) whenever more than ``max_timeline_points`` are held.
        max_timeline_points: bound on the timeline length.
    """

    def __init__(
        self,
        default_category: Hashable = Category.ACTIVATIONS,
        *,
        record_timeline: bool = False,
        max_timeline_points: int = DEFAULT_MAX_TIMELINE_POINTS,
    ) -> None:
        super().__init__()
        self.default_category = default_category
        self.current_bytes = 0
        self.peak_bytes = 0
        self.n_allocs = 0
        self.n_frees = 0
        self._totals: dict[Hashable, int] = {c: 0 for c in Category}
        self._peak_breakdown: dict[Hashable, int] = dict(self._totals)
        self._refs: dict[int, _StorageRef] = {}
        self._on_free_cb = self._on_free  # bound once; shared by every weakref
        # Peak bookkeeping: the fast path compares against one threshold, the
        # smallest peak among the global one and every open phase.
        self._open: list[PhaseRecord] = []
        self._phases: list[PhaseRecord] = []
        self._threshold = 0
        # Timeline (event index counts allocations + frees).
        self._max_points = max(2, int(max_timeline_points))
        self._timeline: list[tuple[int, int]] | None = [] if record_timeline else None
        self._event = 0
        self._stride = 1
        self._bucket_left = 1
        self._bucket_max = -1
        self._bucket_idx = 0
        self._depth = 0
        self._hooks: list[Any] = []
        self._unpatch: list[Any] = []
        self._round = 1
        # Set to a list to log every allocation ("a", key, bytes), free ("f", key) and
        # mark ("m", label) in order: the sim replays it through the CUDA caching
        # allocator (profiler/measure/allocator.py).
        self.events: list | None = None
        self._blas_threads: set[int] = set()  # threads whose first cuBLAS call the log has marked

    def mark(self, label: Any) -> None:
        """A labelled point in the event log (nothing without one)."""
        if self.events is not None:
            self.events.append(("m", label))

    @property
    def round_bytes(self) -> int:
        """Count each storage rounded up to a multiple of this (1: exact bytes; 512: the
        CUDA caching allocator's blocks). Set it before anything is tracked."""
        return self._round

    @round_bytes.setter
    def round_bytes(self, value: int) -> None:
        if value != self._round and self._refs:
            raise ValueError("set round_bytes before the tracker holds any storage")
        self._round = max(1, int(value))

    def _size(self, n: int) -> int:
        r = self._round
        return n if r == 1 else -(-n // r) * r

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **kwargs) if kwargs else func(*args)
        if type(out) in _PLAIN_TENSOR_TYPES:  # the common case first: one plain tensor
            self._see_storage(out.untyped_storage())
        elif isinstance(out, (tuple, list)):
            self._see_many(out)
        elif isinstance(out, _Tensor):
            self._see_tensor(out)
        if self.events is not None and len(self._blas_threads) < 2 and func._overloadpacket in _BLAS_OPS:
            # CUDA runs backward on autograd's device thread, with a cuBLAS handle of its own
            thread = 1 if torch._C._current_graph_task_id() >= 0 else 0
            if thread not in self._blas_threads:
                self._blas_threads.add(thread)
                self.events.append(("m", ("matmul", thread)))
        return out

    def _see_storage(self, st) -> None:
        ref = self._refs.get(id(st))
        if ref is None:
            self._add(st, None)
        elif ref.nbytes != st.nbytes():
            self._resize(ref, st.nbytes())

    def _see_many(self, outs) -> None:
        for o in outs:
            if type(o) in _PLAIN_TENSOR_TYPES:
                self._see_storage(o.untyped_storage())
            elif isinstance(o, (tuple, list)):
                self._see_many(o)
            elif isinstance(o, _Tensor):
                self._see_tensor(o)

    def _see_tensor(self, t: torch.Tensor, tag: Hashable | None = None) -> None:
        for st in self._storages_of(t):
            ref = self._refs.get(id(st))
            if ref is None:
                self._add(st, tag)
            else:
                n = st.nbytes()
                if ref.nbytes != n:
                    self._resize(ref, n)
                if tag is not None and ref.tag != tag:
                    self._retag(ref, tag)

    @staticmethod
    def _storages_of(t: torch.Tensor) -> list:
        if type(t) in _PLAIN_TENSOR_TYPES:
            return [t.untyped_storage()]
        try:  # traceable wrapper subclasses: track their inner tensors' storages
            from torch.distributed._tools.common_utils import get_untyped_storages

            return list(get_untyped_storages(t))
        except Exception:
            try:
                return [t.untyped_storage()]
            except Exception:  # sparse, nested, functional...: no storage to count
                return []

    # ------------------------------------------------------------------ accounting
    def _add(self, st, tag: Hashable | None) -> None:
        if tag is None:
            tag = self.default_category
        n = st.nbytes()
        key = id(st)
        self._refs[key] = _StorageRef(st, self._on_free_cb, key, n, tag)
        self.n_allocs += 1
        if self.events is not None:
            self.events.append(("a", key, n))
        self._grow(tag, n if self._round == 1 else self._size(n))

    def _grow(self, tag: Hashable, delta: int) -> None:
        totals = self._totals
        totals[tag] = totals.get(tag, 0) + delta
        cur = self.current_bytes + delta
        self.current_bytes = cur
        if cur > self._threshold:
            self._new_peak(cur)
        if self._timeline is not None:
            self._sample(cur)

    def _on_free(self, ref: _StorageRef) -> None:
        # Weakref callback: runs while the storage object is being deallocated.
        if self._refs.get(ref.key) is ref:
            del self._refs[ref.key]
        self.n_frees += 1
        if self.events is not None:
            self.events.append(("f", ref.key))
        n = ref.nbytes if self._round == 1 else self._size(ref.nbytes)
        self._totals[ref.tag] -= n
        self.current_bytes -= n
        if self._timeline is not None:
            self._sample(self.current_bytes)

    def _resize(self, ref: _StorageRef, n: int) -> None:
        if self.events is not None:  # a resized storage is a new block to the allocator
            self.events += [("f", ref.key), ("a", ref.key, n)]
        delta = self._size(n) - self._size(ref.nbytes)
        ref.nbytes = n
        self._grow(ref.tag, delta)

    def _retag(self, ref: _StorageRef, tag: Hashable) -> None:
        totals = self._totals
        n = self._size(ref.nbytes)
        totals[ref.tag] -= n
        totals[tag] = totals.get(tag, 0) + n
        ref.tag = tag

    def _new_peak(self, cur: int) -> None:
        # Slow path, only when some peak (global or an open phase's) is exceeded.
        snap = None
        if cur > self.peak_bytes:
            self.peak_bytes = cur
            snap = dict(self._totals)
            self._peak_breakdown = snap
        threshold = self.peak_bytes
        for rec in self._open:
            if cur > rec.peak_bytes:
                rec.peak_bytes = cur
                if snap is None:
                    snap = dict(self._totals)
                rec.peak_breakdown = snap  # shared, never mutated afterwards
            if rec.peak_bytes < threshold:
                threshold = rec.peak_bytes
        self._threshold = threshold

    def _recompute_threshold(self) -> None:
        self._threshold = min([self.peak_bytes] + [r.peak_bytes for r in self._open])

    def _sample(self, cur: int) -> None:
        idx = self._event
        self._event = idx + 1
        if cur > self._bucket_max:
            self._bucket_max = cur
            self._bucket_idx = idx
        self._bucket_left -= 1
        if self._bucket_left:
            return
        tl = self._timeline
        tl.append((self._bucket_idx, self._bucket_max))
        self._bucket_max = -1
        if len(tl) >= self._max_points:
            # Merge neighbours, keeping the higher sample: peaks are preserved.
            merged = [a if a[1] >= b[1] else b for a, b in zip(tl[0::2], tl[1::2])]
            if len(tl) % 2:
                merged.append(tl[-1])
            tl[:] = merged
            self._stride *= 2
        self._bucket_left = self._stride

    # ------------------------------------------------------------------ public API
    def track(self, tensors: Any, category: Hashable | None = None) -> int:
        """Register and/or (re)tag the storages of existing tensors.

        ``tensors`` may be a tensor, an ``nn.Module`` (its parameters and buffers),
        a ``torch.optim.Optimizer`` (its state tensors), or any (nested) iterable or
        dict of those; ``None`` entries are skipped (handy for ``p.grad``). Storages
        not yet tracked are registered under ``category`` (the default category if
        ``None``); tracked ones are moved to ``category`` (totals unchanged) unless
        it is ``None``. Works with the mode active or not. Returns the bytes of the
        distinct storages touched.
        """
        seen: set[int] = set()
        nbytes = 0
        for t in _iter_tensors(tensors):
            for st in self._storages_of(t):
                if id(st) in seen:
                    continue
                seen.add(id(st))
                nbytes += st.nbytes()
            self._see_tensor(t, category)
        return nbytes

    def watch_grads(self, params: Any, category: Hashable = Category.GRADIENTS) -> None:
        """Tag each ``p.grad`` as ``category`` as soon as autograd accumulates it.

        Installs ``register_post_accumulate_grad_hook`` on every parameter that
        requires grad (``params``: a module or an iterable of parameters). The
        grad's bytes are counted under the default tag from their allocation until
        the hook runs, so a peak hit in between still shows them there. Hooks act
        only while the tracker is active; :meth:`remove_hooks` removes them.
        """
        if isinstance(params, torch.nn.Module):
            params = params.parameters()

        def hook(p: torch.Tensor) -> None:
            if self._depth and p.grad is not None:
                self._see_tensor(p.grad, category)

        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def watch_optimizer(
        self, optimizer: torch.optim.Optimizer, category: Hashable = Category.OPTIMIZER_STATE
    ) -> None:
        """Tag ``optimizer``'s state as ``category`` at creation and after each step.

        State that the optimizer creates lazily in its private ``_init_group``
        (Adam/AdamW moments and ``step``) is tagged at allocation, so the first
        step's peak breakdown shows it as optimizer state, not as the default tag;
        a step post-hook re-tags whatever else ended up in ``optimizer.state``
        (e.g. SGD momentum buffers). Acts only while the tracker is active;
        :meth:`remove_hooks` undoes it.
        """
        init_group = getattr(optimizer, "_init_group", None)
        if callable(init_group) and "_init_group" not in vars(optimizer):

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                prev = self.default_category
                if self._depth:
                    self.default_category = category
                try:
                    return init_group(*args, **kwargs)
                finally:
                    self.default_category = prev

            optimizer._init_group = wrapped  # instance attribute shadows the method
            self._unpatch.append(lambda: vars(optimizer).pop("_init_group", None))

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._depth:
                self.track(opt, category)

        self._hooks.append(optimizer.register_step_post_hook(post))

    def remove_hooks(self) -> None:
        """Remove every hook / patch installed by ``watch_grads`` / ``watch_optimizer``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for undo in self._unpatch:
            undo()
        self._unpatch.clear()

    def category_of(self, t: torch.Tensor) -> Hashable | None:
        """The tag of ``t``'s storage, or ``None`` if it is not tracked."""
        for st in self._storages_of(t):
            ref = self._refs.get(id(st))
            if ref is not None:
                return ref.tag
        return None

    def bytes_by_category(self) -> dict[str, int]:
        """Current bytes per tag (a copy)."""
        return _plain(self._totals)

    def reset_peak(self) -> None:
        """Restart the global peak (and its breakdown) from the current bytes."""
        self.peak_bytes = self.current_bytes
        self._peak_breakdown = dict(self._totals)
        self._recompute_threshold()

    @contextmanager
    def phase(self, name: Any) -> Iterator[PhaseRecord]:
        """Record start / peak (+ breakdown at the peak) / end bytes of a block.

        Phases may nest and repeat; each entry yields a new :class:`PhaseRecord`.
        """
        cur = self.current_bytes
        snap = dict(self._totals)
        timed = self._timeline is not None
        rec = PhaseRecord(
            name=str(name), index=len(self._phases), start_bytes=cur,
            peak_bytes=cur, peak_breakdown=snap, start_event=self._event if timed else -1,
        )
        self._phases.append(rec)
        self._open.append(rec)
        if cur < self._threshold:
            self._threshold = cur
        try:
            yield rec
        finally:
            self._open.remove(rec)
            rec.end_bytes = self.current_bytes
            rec.end_breakdown = _plain(self._totals)
            if timed:
                rec.end_event = self._event
            self._recompute_threshold()

    def results(self) -> TrackerResults:
        """Plain-data snapshot: totals, peaks, phases, timeline."""
        phases = [
            PhaseRecord(
                name=r.name, index=r.index, start_bytes=r.start_bytes,
                peak_bytes=r.peak_bytes,
                end_bytes=r.end_bytes if r.end_bytes >= 0 else -1,
                peak_breakdown=_plain(r.peak_breakdown),
                end_breakdown=dict(r.end_breakdown),
                start_event=r.start_event, end_event=r.end_event,
            )
            for r in self._phases
        ]
        timeline = None
        if self._timeline is not None:
            timeline = list(self._timeline)
            if self._bucket_max >= 0:  # the partially filled last bucket
                timeline.append((self._bucket_idx, self._bucket_max))
        return TrackerResults(
            current_bytes=self.current_bytes,
            peak_bytes=self.peak_bytes,
            peak_breakdown=_plain(self._peak_breakdown),
            current_breakdown=_plain(self._totals),
            phases=phases,
            live_storages=len(self._refs),
            n_allocs=self.n_allocs,
            n_frees=self.n_frees,
            timeline=timeline,
        )

    # ------------------------------------------------------------------ mode entry
    def __enter__(self) -> StorageTracker:
        self._depth += 1
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        super().__exit__(*exc)

    @property
    def active(self) -> bool:
        """Whether the mode is currently entered."""
        return self._depth > 0


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if obj is None:
        return
    if isinstance(obj, _Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _state_tensors(state)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for v in obj:
            yield from _iter_tensors(v)
    else:
        raise TypeError(f"cannot track an object of type {type(obj).__name__}")


def _state_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The tensors of one parameter's optimizer state. State holds plain numbers beside
    them (Adafactor's ``state["step"]`` is an int, transformers/optimization.py), which
    own no storage: skipped, not refused."""
    if isinstance(state, _Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _state_tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _state_tensors(v)
