"""The estimate's own allocation sequence, replayed through the caching allocator's rules
(estimator/allocator.py): what ``max_memory_reserved`` says per phase.

The sequence is built from the terms the estimate already computes -- every parameter
tensor of the inventory, its gradient and optimizer state, each decoder layer's saved
activations (``activations.py``, split back into tensors of the widths that make them),
the logits and the loss's buffers (``logits.py``), autocast's weight copies, the
optimizer's temporaries (``optimizer.py``), the cuBLAS workspaces -- in the order a step
makes and frees them: the model loaded, then the first step (the optimizer makes its
state in it) and two more (state reused), each forward, backward (layers in reverse),
optimizer step and ``zero_grad``. Between steps the cache is emptied where the loop does
it (``Setup.empty_cache_steps``: the profiler's harness empties it before every step).

Around the saved tensors each block of a layer (attention, MLP) holds transients of the
same widths, freed where their op ends: in forward a norm's fp32 working copy, the
block's projection output and the new residual stream; in backward the gradient arriving
from above, the block's intermediate gradients and the gradient it passes down. So the
replay sees the holes the saved tensors are carved around. Not modelled: the exact op
order inside a family's layer (one generic block order for every family), and
cross-stream waits (FSDP's all-gather and reduce-scatter buffers get pools of their own).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .allocator import AllocConf, CachingAllocator
from .categories import Phase
from .units import FP32

#: Steps a replayed training loop runs: the first (the optimizer makes its state in it) and
#: one more (state reused). A third and a fourth replay exactly as the second on every H200
#: case, with the cache emptied between steps and without (the second step starts from what
#: the first left, and leaves the same).
STEPS = 2
#: streams: the default one, and the side streams FSDP2 all-gathers and reduce-scatters on
#: (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py: ``all_gather_stream``,
#: ``reduce_scatter_stream``, each a pool of its own in the allocator)
DEFAULT_STREAM, ALL_GATHER_STREAM, REDUCE_SCATTER_STREAM = 0, 1, 2
LOAD = "load"


@dataclass(frozen=True)
class PhasePeak:
    """One phase's peaks in a replay (its worst step's, by allocated bytes, as the
    harness's meter keeps them)."""

    allocated: int
    reserved: int


@dataclass(frozen=True)
class Replay:
    """Per-phase peaks of the steady steps and of the first step, the load's, and whether
    the sequence ran out of a card (a replay given a capacity)."""

    steady: dict[Phase, PhasePeak]
    first: dict[Phase, PhasePeak]
    load: PhasePeak
    oom: bool = False
    retries: int = 0

    @property
    def peak_reserved(self) -> int:
        values = [p.reserved for p in self.steady.values()] + [p.reserved for p in self.first.values()]
        return max(values + [self.load.reserved])


class Trace:
    """A sequence of allocations and frees: ``("a", key, bytes, stream)``, ``("f", key)``,
    marks ``("m", label)``."""

    __slots__ = ("events", "_next", "pending", "workspaces")

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._next = 0
        self.pending: tuple[int, ...] = ()  # cuBLAS workspaces due at the next matmul
        self.workspaces: list[int] = []

    def matmul(self) -> None:
        """A cuBLAS call: a handle's workspace is allocated through the caching allocator at
        the first one on its thread and stream, and kept (aten/src/ATen/cuda/CublasHandlePool.cpp
        ``getCUDABlasLtWorkspace``: looked up per handle and stream, ``getNewWorkspace`` ->
        ``CUDACachingAllocator::get()->allocate``) -- so it is carved from whatever the
        cache holds at that moment, not before the step."""
        if self.pending:
            self.workspaces += self.many(self.pending)
            self.pending = ()

    def a(self, nbytes: int, stream: int = DEFAULT_STREAM) -> int:
        """Allocate ``nbytes`` (nothing for <= 0); returns the key (-1 for nothing)."""
        if nbytes <= 0:
            return -1
        self._next += 1
        self.events.append(("a", self._next, int(nbytes), stream))
        return self._next

    def many(self, sizes, stream: int = DEFAULT_STREAM) -> list[int]:
        return [self.a(s, stream) for s in sizes]

    def f(self, *keys: int) -> None:
        self.free_all(keys)

    def free_all(self, keys) -> None:
        events = self.events
        for key in keys:
            if key >= 0:
                events.append(("f", key))

    def begin(self, step: int, phase: str) -> None:
        self.events.append(("m", ("begin", step, phase)))

    def end(self, step: int, phase: str) -> None:
        self.events.append(("m", ("end", step, phase)))

    def empty_cache(self) -> None:
        self.events.append(("m", "empty_cache"))


def replay(events: list[tuple], conf: AllocConf, capacity_bytes: int | None = None) -> Replay:
    """Replay a trace whose phases are marked ``("begin", step, phase)`` / ``("end", step,
    phase)`` (step 0 is the first; phase ``"load"`` before it) and whose cache is emptied at
    ``"empty_cache"``; peaks reset at each begin (the harness's ``reset_peak_memory_stats``)."""
    model = CachingAllocator(conf, capacity_bytes)
    malloc, free = model.malloc, model.free
    steady: dict[Phase, PhasePeak] = {}
    first: dict[Phase, PhasePeak] = {}
    load = PhasePeak(0, 0)
    for event in events:
        kind = event[0]
        if kind == "a":
            if not malloc(event[1], event[2], event[3]):
                break
        elif kind == "f":
            free(event[1])
        else:
            label = event[1]
            if label == "empty_cache":
                model.empty_cache()
            elif label[0] == "begin":
                model.reset_peaks()
            else:
                peak = PhasePeak(model.peak_allocated, model.peak_reserved)
                if label[2] == LOAD:
                    load = peak
                    continue
                out = first if label[1] == 0 else steady
                ph = Phase(label[2])
                if ph not in out or peak.allocated > out[ph].allocated:
                    out[ph] = peak
    return Replay(steady, first, load, model.oom, model.num_alloc_retries)


# ---------------------------------------------------------------------- tensor widths
def pieces(total: int, widths, limit: int = 8) -> list[int]:
    """``total`` bytes (per token) as tensors of the given widths, largest first, at most
    ``limit`` of them, and what no width fits as one more: how a term that sums several
    saved tensors (q, k and v; an MLP's activations) is split back into them."""
    out: list[int] = []
    left = total
    for w in sorted({w for w in widths if w > 0}, reverse=True):
        while left >= w and len(out) < limit:
            out.append(w)
            left -= w
    if left > 0:
        out.append(left)
    return out


@dataclass(frozen=True)
class Widths:
    """Bytes per token of a decoder layer's tensors."""

    h: int  # hidden
    q: int  # query heads x head dim
    kv: int  # key/value heads x head dim
    f: int  # MLP intermediate (x experts per token)
    p: int  # compute bytes
    resid: int  # residual-stream bytes (fp32 under autocast)
    lin: int  # a linear's saved input (half under autocast)
    fused_mlp: bool  # one gate_up output (Phi-3)
    fused_qkv: bool  # one qkv output the kernel's inputs are views of

    def of(self, name: str) -> tuple[int, ...]:
        """The widths a saved term (activations.py's names) is made of."""
        h, q, kv, f, p = self.h, self.q, self.kv, self.f, self.p
        if name.startswith("mlp"):
            return ((2 * f * p,) if self.fused_mlp else ()) + (f * p,)
        if name.startswith("attn_qkv") or name == "attn_cache":
            return (((q + 2 * kv) * p,) if self.fused_qkv else ()) + (q * p, kv * p)
        if name in ("attn_out", "o_proj_input"):
            return (q * p,)
        if name == "linear_inputs":
            return (h * self.lin,)
        if name == "layer_input":
            return (h * self.resid,)
        if name.endswith("dropout"):
            return (h,)  # bool masks
        return (h * FP32, h * self.resid, h * p, h)


#: per-layer terms whose size is (b, a, s, s): one tensor each
_SQUARE = ("attn_scores", "attn_softcap", "attn_dropout", "attn_clamp")
#: per-layer terms a layer's two blocks share (split evenly, the attention block first)
_SHARED = ("norms", "linear_inputs", "resid_dropout", "lora_adapters")


@dataclass(frozen=True)
class Block:
    """One block of a layer: the saved tensors its forward makes (in order), the
    transients of its forward and backward, the weight gradients its backward makes and
    autocast's weight copies its forward makes."""

    saved: tuple[int, ...]
    fwd: tuple[int, ...]
    bwd: tuple[int, ...]
    grads: tuple[int, ...]
    casts: tuple[int, ...]


def split_layer(per_layer: dict[str, int], norms: int, w: Widths, T: int) -> tuple[list[int], list[int]]:
    """A layer's saved terms (bytes at the step's shape) as tensors of its attention and
    MLP blocks."""
    attn: list[int] = []
    mlp: list[int] = []
    for name, total in per_layer.items():
        if total <= 0:
            continue
        if name.startswith(_SQUARE) or name in ("masked", "layer_input"):
            attn.append(total)
            continue
        per_token = -(-total // max(T, 1))
        if name == "norms":
            each = pieces(per_token // max(norms, 1), w.of(name), 3)
            first = max(norms // 2, 1)
            attn += [x * T for x in each] * first
            mlp += [x * T for x in each] * (norms - first)
        elif name in _SHARED:
            parts = [x * T for x in pieces(per_token, w.of(name))]
            cut = max(len(parts) // 2, 1)
            attn += parts[:cut]
            mlp += parts[cut:]
        elif name.startswith("attn") or name == "o_proj_input":
            attn += [x * T for x in pieces(per_token, w.of(name))]
        else:
            mlp += [x * T for x in pieces(per_token, w.of(name))]
    return attn, mlp


def blocks(per_layer: dict[str, int], norms: int, w: Widths, T: int, square: int,
           grads: tuple[tuple[int, ...], tuple[int, ...]], casts: tuple[tuple[int, ...], tuple[int, ...]]
           ) -> tuple[Block, Block]:
    """A layer's attention and MLP blocks. ``square``: one (b, a, s, s) score tensor of the
    eager kernel (0 for fused kernels); ``grads`` / ``casts``: per block, its weight
    gradients and autocast copies."""
    attn, mlp = split_layer(per_layer, norms, w, T)
    h, r, p = w.h * T, w.resid * w.h * T, w.p * T
    # forward: the norm's fp32 working copy, the projection output (attention: q before it is
    # rotated and saved; MLP: the up projection), the block's output and the new residual
    # backward: the incoming residual gradient's partner, the kernel's q/k/v gradients (or
    # the scores' gradient and the softmax backward's output), each projection's input gradient
    fwd_attn = (FP32 * h, w.q * p, w.p * h, r)
    fwd_mlp = (FP32 * h, w.f * p, w.p * h, r)
    bwd_attn = (r, (w.q + 2 * w.kv) * p, square, square, w.p * h)
    bwd_mlp = (r, w.f * p, w.f * p, w.p * h)
    return (Block(tuple(attn), fwd_attn, bwd_attn, grads[0], casts[0]),
            Block(tuple(mlp), fwd_mlp, bwd_mlp, grads[1], casts[1]))


@lru_cache(maxsize=512)
def inventory_bytes(spec) -> tuple[tuple[int, ...], tuple[tuple[int, str], ...], tuple[int, ...]]:
    """Element counts: the embedding tensors, one layer's (with their groups), the final
    tensors (a tied head counted with the embeddings), in ``model.parameters()`` order."""
    from .archs import inventory_of
    inv = inventory_of(spec)
    return (tuple(t.elems for t in inv.embeddings),
            tuple((t.elems, t.group if t.cols > 1 or t.group == "norms" else t.group + "-vector") for t in inv.layer),
            tuple(t.elems for t in inv.final))


def by_block(layer: tuple[tuple[int, str], ...], scale: float,
             matrices: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A layer's tensors (scaled to bytes) by block: attention (and its norm), MLP (and its);
    ``matrices``: the weight matrices only (what autocast casts)."""
    attn, mlp = [], []
    norms = [] if matrices else [e for e, g in layer if g == "norms"]
    for e, g in layer:
        if g == "norms" or (matrices and g.endswith("-vector")):
            continue
        if g.startswith("mlp"):
            mlp.append(int(e * scale))
        else:
            attn.append(int(e * scale))
    half = len(norms) // 2 or len(norms)
    attn += [int(e * scale) for e in norms[:half]]
    mlp += [int(e * scale) for e in norms[half:]]
    return tuple(attn), tuple(mlp)


# ---------------------------------------------------------------------- training
@dataclass(frozen=True)
class Stack:
    """Tensors of a model as the root's before the layers, one layer's, the root's after."""

    head: tuple[int, ...] = ()
    layer: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()

    def expand(self, layers: int) -> tuple[int, ...]:
        return self.head + self.layer * layers + self.tail

    def scaled(self, factor: float, repeat: int = 1) -> Stack:
        """Every tensor times ``factor``, each ``repeat`` times in a row."""
        s = lambda xs: tuple(int(x * factor) for x in xs for _ in range(repeat))  # noqa: E731
        return Stack(s(self.head), s(self.layer), s(self.tail))

    @property
    def per_layer(self) -> int:
        return sum(self.layer)


@dataclass(frozen=True)
class StepTerms:
    """What a training step's trace is built from: the estimate's terms at the step's
    shape, per rank (estimate.py's ``_Static`` and the activation and logits terms)."""

    weights: tuple[Stack, ...]  # parameter tensors in load order (bytes on this rank): the model's, then peft's
    staging: Stack  # quantize-on-load: each quantized weight's 16-bit copy (model_weights)
    dropped: int  # Load.CONFIG: a tied head's own weight, made and dropped at tie_weights()
    layers: int
    head_grad: int  # the LM head's weight gradient (made first in backward; a tied one waits apart)
    root_grads: tuple[int, ...]  # the final norm's (made right after it)
    tied: bool
    embed_grad: int  # the input embedding's dense gradient (made last)
    embed_other: tuple[int, ...]  # other embedding tensors' gradients (learned positions)
    states: Stack  # optimizer state tensors, in the order the first step makes them
    masters: Stack  # mixed-bf16's fp32 master weights (made with the optimizer)
    master_grads: Stack  # ... and the fp32 gradient copies each step makes
    temps: Stack  # the optimizer's temporaries, per trainable tensor
    temps_at_once: bool  # foreach: one list alive at once; the for-loop: one tensor's at a time
    blocks: tuple[Block, Block]
    recompute: tuple[Block, Block] | None  # a checkpointed layer's full blocks, rebuilt in backward
    outside: tuple[int, ...]  # saved once per model at the loss (final norm, head input)
    embed_out: int  # the embedding's output (the first layer's input)
    logits_fwd: tuple[int, ...]  # alive at the loss: logits, fp32 copy, log-softmax (saved last)
    logits_saved: int  # what the loss saves for backward (the log-softmax)
    logits_bwd: tuple[int, ...]  # the loss backward's gradients
    logits_grad: int  # the gradient cast back to the logits' dtype, what the LM head's backward reads
    head_input_grad: int
    casts_head: int  # autocast's copy of the LM head weight
    workspaces: tuple[int, ...]
    buckets: int  # DDP's flat gradient buckets
    gather: int  # one layer's all-gathered parameters (FSDP2 / ZeRO-3 / FSDP1), side stream
    gather_root: int
    reduce: int  # one layer's reduce-scatter input, side stream
    grad_accum: int
    keep_grads: bool
    manual: bool  # the outputs (logits) live through backward
    held: bool  # ... and into the next forward
    optimizer: bool
    empty_cache_steps: int


def training_trace(t: StepTerms, layers: int | None = None, steps: int = STEPS) -> Trace:
    """The load and ``steps`` training steps of ``t`` (with ``layers`` decoder layers: the
    model's unless told), as allocations and frees."""
    L = t.layers if layers is None else layers
    if L != t.layers:
        from dataclasses import replace
        t = replace(t, layers=L)
    tr = Trace()
    a, f, many, free_all = tr.a, tr.f, tr.many, tr.free_all
    tr.begin(0, LOAD)
    load(tr, t.weights, t.staging, L, t.dropped)
    masters = many(t.masters.expand(L))  # mixed-bf16: the optimizer's fp32 copies, made with it
    buckets = a(t.buckets)  # DDP's Reducer allocates its buckets at construction
    tr.end(0, LOAD)
    grads: list[int] = []
    states: list[int] = []
    held = -1
    for step in range(steps):
        if step and t.empty_cache_steps and step % t.empty_cache_steps == 0:
            tr.empty_cache()
        for _micro in range(t.grad_accum):
            accumulate = bool(grads)  # .grad exists: new gradients are added into it
            tr.begin(step, "forward")
            if not step and not _micro:  # the main thread's handle: its first matmul is in this forward
                tr.pending = t.workspaces[:1]
            kept, logits, lsm, outside, x, casts = _forward(tr, t)
            if held >= 0:
                f(held)  # Loop.HELD: the previous step's outputs, dropped once this forward returns
                held = -1
            if not t.manual:
                f(logits)  # the Trainer drops the outputs before backward
            tr.end(step, "forward")
            tr.begin(step, "backward")
            if not step and not _micro:  # autograd's device thread has a handle of its own
                tr.pending = t.workspaces[1:]
            new = _backward(tr, t, kept, lsm, outside, x, casts, accumulate)
            grads += new
            if t.manual:
                if t.held:
                    held = logits
                else:
                    f(logits)
            tr.end(step, "backward")
        if t.optimizer:
            tr.begin(step, "optimizer")
            if not states:
                states = many(t.states.expand(L))  # the first step() makes the state (torch/optim: _init_group)
            mg = many(t.master_grads.expand(L))
            if t.temps_at_once:
                free_all(many(t.temps.expand(L)))
            else:
                for size in t.temps.expand(L):
                    free_all(many((size, size)))
            free_all(mg)
            tr.end(step, "optimizer")
        tr.begin(step, "zero_grad")
        if not t.keep_grads:
            free_all(grads)
            grads = []
        tr.end(step, "zero_grad")
    del masters, buckets
    return tr


def load(tr: Trace, weights: tuple[Stack, ...], staging: Stack, layers: int, dropped: int = 0) -> None:
    """The model's tensors in load order; a quantized one is packed from a 16-bit copy
    made first and freed after. ``dropped``: a tensor made after them and freed (a tied
    head's own weight under ``Load.CONFIG``)."""
    stage = staging.expand(layers)
    for i, stack in enumerate(weights):
        sizes = stack.expand(layers)
        if i or not any(stage):
            tr.many(sizes)
        else:
            offset = len(stack.head)
            for j, size in enumerate(sizes):
                copy = tr.a(stage[j - offset]) if 0 <= j - offset < len(stage) else -1
                tr.a(size)
                tr.f(copy)
        if i == 0:
            tr.f(tr.a(dropped))


def _block_forward(tr: Trace, b: Block, resid: int) -> tuple[list[int], int]:
    """A block's forward: autocast copies, the norm's working copy, the saved tensors, the
    projection output, the block output and the new residual stream (which replaces
    ``resid``). Returns (its saved keys and casts, the new residual)."""
    a, f = tr.a, tr.f
    casts = tr.many(b.casts)
    norm_tmp, mid, out, new = b.fwd
    t0 = a(norm_tmp)
    saved = tr.many(b.saved)
    f(t0)
    t1 = a(mid)
    t2 = a(out)
    f(t1)
    r = a(new)
    f(t2, resid)
    return saved + casts, r


def _forward(tr: Trace, t: StepTerms):
    a = tr.a
    gather = [a(t.gather_root, ALL_GATHER_STREAM)]
    x = a(t.embed_out)
    tr.matmul()  # the rotary embedding's inv_freq @ positions, or the first layer's first projection
    resid = a(t.blocks[0].fwd[3])
    kept: list[list[int]] = []
    blocks = t.blocks
    for _ in range(t.layers):
        if t.gather:
            gather.append(a(t.gather, ALL_GATHER_STREAM))
            if len(gather) > 2:  # the previous layer's buffer goes once this one is gathered
                tr.f(gather.pop(1))
        layer: list[int] = []
        for b in blocks:
            saved, resid = _block_forward(tr, b, resid)
            layer += saved
        kept.append(layer)
    outside = tr.many(t.outside)
    casts = [a(t.casts_head)]
    logits_keys = tr.many(t.logits_fwd)
    lsm = logits_keys.pop() if t.logits_saved else -1
    logits = logits_keys.pop(0) if logits_keys else -1
    tr.free_all(logits_keys)  # the fp32 copy goes when the loss returns
    tr.f(resid)
    tr.free_all(gather)
    return kept, logits, lsm, outside, x, casts


def _backward(tr: Trace, t: StepTerms, kept, lsm: int, outside, x: int, casts, accumulate: bool) -> list[int]:
    """Backward from the loss to the embedding; returns the gradients it made (.grad)."""
    a, f, many, free_all = tr.a, tr.f, tr.many, tr.free_all
    made: list[int] = []

    def grad(size: int) -> None:
        if accumulate:  # AccumulateGrad adds a new gradient into the existing .grad
            f(a(size))
        else:
            made.append(a(size))

    g = many(t.logits_bwd)
    f(lsm)
    if t.logits_grad:  # ToCopyBackward (the loss's logits.float()): the fp32 gradient cast back,
        free_all(g[:-1])  # once log_softmax's backward has released its incoming gradient
        cast = a(t.logits_grad)
        free_all(g[-1:])
        g = [cast]
    # the LM head's MmBackward0 reads that gradient twice: the weight's gradient first, the
    # input's second (the order the sim's trace of the real backward shows); cuBLAS makes the
    # autograd thread's workspace at the first of them, after its output
    head = a(t.head_grad) if t.tied and not accumulate else -1  # a tied one waits in InputBuffer
    if not t.tied:
        grad(t.head_grad)
    tr.matmul()
    gin = a(t.head_input_grad)
    free_all(g)
    for size in t.root_grads:
        grad(size)
    free_all(casts)
    free_all(outside)
    gather = [a(t.gather_root, ALL_GATHER_STREAM)]
    up = gin
    for layer in reversed(kept):
        if t.gather:
            gather.append(a(t.gather, ALL_GATHER_STREAM))
            if len(gather) > 2:
                f(gather.pop(1))
        if t.recompute is not None:  # a checkpointed layer is rebuilt before its backward
            resid = a(t.recompute[0].fwd[3])
            rebuilt: list[int] = []
            for b in t.recompute:
                saved, resid = _block_forward(tr, b, resid)
                rebuilt += saved
            f(resid)
            layer = layer + rebuilt
        for b in reversed(t.blocks if t.recompute is None else t.recompute):
            tmp = many(b.bwd[1:-1])
            for size in reversed(b.grads):
                grad(size)
            down = a(b.bwd[-1])
            free_all(tmp)
            nxt = a(b.bwd[0])
            f(down, up)
            up = nxt
        if t.reduce:
            f(a(t.reduce, REDUCE_SCATTER_STREAM))
        free_all(reversed(layer))
    for size in t.embed_other:
        grad(size)
    emb = a(t.embed_grad)
    if t.tied and head >= 0:
        total = a(t.embed_grad)  # InputBuffer's sum of the head's and the embedding's gradients
        f(head, emb)
        made.append(total)
    elif t.tied:
        f(emb)
    elif accumulate:
        f(emb)
    else:
        made.append(emb)
    f(up, x)
    free_all(gather)
    return made


def step_terms(spec, setup, st, k: float) -> StepTerms:
    """The training trace's terms from the estimate's (``st``: estimate.py's ``_Static``
    for this setup's shape-free key; ``k``: the activation factor in force)."""
    from .activations import checkpointed_activations, training_activations
    from .archs import MLP, traits
    from .kernels import eager_softmax_bytes, fused_qkv
    from .logits import logits_bytes
    from .optimizer import STATE_TENSORS
    from .params import lora_params, lora_targets
    from .setup import Loop, Loss, Mode, Optimizer, OptimizerImpl
    T, L = setup.batch * setup.seq, spec.num_layers
    p, V, e = setup.precision.compute_bytes, spec.vocab_size, spec.embed_dim or spec.hidden_size
    autocast = setup.precision.is_autocast
    resid, lin = (FP32, 2) if autocast else (p, p)
    emb, layer, final = inventory_bytes(spec)
    layer_elems = sum(x for x, _ in layer)
    base_elems = sum(emb) + L * layer_elems + sum(final)
    lora = setup.mode in (Mode.LORA, Mode.QLORA)
    shares = st.weights / max(st.states.weights, 1)  # this rank's share of every tensor
    adapters = setup.adapter_bytes * lora_params(spec, setup.lora_targets, setup.lora_rank) if lora else 0
    wscale = max(st.weights - adapters * shares, 0) / max(base_elems, 1)
    base = Stack(tuple(emb), tuple(x for x, _ in layer), tuple(final))
    # LoRA: each targeted linear's A (r x in) and B (out x r), per layer (elements)
    ad_attn, ad_mlp = [], []
    for t in (lora_targets(spec, setup.lora_targets) if lora else []):
        pair = [setup.lora_rank * t.in_features, setup.lora_rank * t.out_features]
        (ad_mlp if t.group == "mlp" else ad_attn).extend(pair)
    adapter = Stack(layer=tuple(ad_attn + ad_mlp))
    weights = (base.scaled(wscale), adapter.scaled(setup.adapter_bytes * shares))
    staging = Stack()
    if setup.quant.value != "none":
        qbase, staging = model_weights(spec, setup, max(int(st.weights - adapters * shares), 0))
        weights = (qbase, weights[1])
    full = setup.mode is Mode.FULL
    trainable = base if full else adapter
    total_elems = max(trainable.expand(L) and sum(trainable.expand(L)), 1)
    gbytes = st.gradients / total_elems  # per element on this rank
    if full:
        grads_attn, grads_mlp = by_block(layer, gbytes)
        embed = int(emb[0] * gbytes) if emb else 0
        embed_other = tuple(int(x * gbytes) for x in emb[1:])
        head = int(V * e * gbytes)
        root = tuple(int(x * gbytes) for x in final if x != V * e)
    elif setup.layer_units:
        # FSDP1 layer units: the gradients are the layers' whole flat parameters (sharding.py
        # _fsdp1_layer_unit_states), the root's none
        grads_attn, grads_mlp = by_block(layer, st.gradients / max(L * layer_elems, 1))
        embed, embed_other, head, root = 0, (), 0, ()
    else:
        grads_attn = tuple(int(x * gbytes) for x in ad_attn)
        grads_mlp = tuple(int(x * gbytes) for x in ad_mlp)
        embed, embed_other, head, root = 0, (), 0, ()
    n_state = STATE_TENSORS.get(setup.optimizer, 0)
    state_total = max(st.optimizer_state - st.master_weights, 0)
    states = trainable.scaled(state_total / total_elems / max(n_state, 1), n_state) if n_state else Stack()
    masters = trainable.scaled(st.master_weights / total_elems) if st.master_weights else Stack()
    master_grads = trainable.scaled(st.master_grads / total_elems) if st.master_grads else Stack()
    impl = setup.resolved_optimizer_impl
    at_once = impl is OptimizerImpl.FOREACH
    if not st.opt_temps or setup.optimizer is Optimizer.NONE:
        temps = Stack()
    elif at_once:
        temps = trainable.scaled(st.opt_temps / total_elems)
    else:  # the for-loop: two temporaries of one tensor at a time (optimizer_temporaries)
        big = max(trainable.expand(1))
        temps = trainable.scaled(st.opt_temps / big / 2)
    act = checkpointed_activations(spec, setup) if setup.grad_ckpt else training_activations(spec, setup)
    per_layer = {name: int(v * k) for name, v in act.per_layer.items()}
    tr_ = traits(spec, setup)
    experts = spec.experts_per_token if spec.num_experts else 1
    w = Widths(spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size * experts, p, resid, lin,
               tr_.mlp is MLP.GATED_FUSED, fused_qkv(spec, setup))
    square = eager_softmax_bytes(spec, setup) * spec.num_heads * setup.batch * setup.seq ** 2 \
        if setup.attn.value == "eager" else 0
    # autocast's half copies: the head's, and each layer's by block (its linears' share)
    head_cast = 2 * V * e if autocast and st.cast_fwd else 0
    layer_cast = max(st.cast_fwd - head_cast, 0) / max(L, 1)
    la, lm = by_block(layer, 1.0, matrices=True)
    scale = layer_cast / max(sum(la) + sum(lm), 1)
    casts = (tuple(int(x * scale) for x in la), tuple(int(x * scale) for x in lm)) if layer_cast else ((), ())
    blk = blocks(per_layer, spec.norms_per_layer, w, T, square, (grads_attn, grads_mlp), casts)
    recompute = None
    if setup.grad_ckpt:
        rebuilt = {name: int(v * k) for name, v in training_activations(spec, setup).per_layer.items()}
        recompute = blocks(rebuilt, spec.norms_per_layer, w, T, square, (grads_attn, grads_mlp), ((), ()))
        blk = (Block(blk[0].saved + blk[1].saved, blk[0].fwd, blk[0].bwd, (), ()),
               Block((), blk[1].fwd, blk[1].bwd, (), ()))
    outside = []
    for name, v in act.outside.items():
        v = int(v * k)
        if v <= 0 or name in ("recomputed_layer", "first_layer_frozen", "masked_layers", "lora_expert_weights"):
            continue
        outside += [x * T for x in pieces(-(-v // max(T, 1)), w.of("norms" if "norm" in name else name))]
    lg = {ph: int(v * k) for ph, v in logits_bytes(spec, setup).items()}
    TV = T * V
    if setup.loss is Loss.LOGITS_SUM:
        logits_fwd, saved, logits_bwd = pieces(lg["forward"], (p * TV,)), 0, pieces(lg["backward"], (p * TV,))
    else:
        saved = FP32 * TV
        rest = pieces(max(lg["forward"] - p * TV - saved, 0), (FP32 * TV, p * TV))
        logits_fwd = [p * TV] + rest + [saved]
        logits_bwd = pieces(max(lg["backward"] - saved, 0), (FP32 * TV, p * TV))
    # transformers' ForCausalLMLoss upcasts with logits.float() (loss/loss_utils.py): in
    # backward the fp32 gradient log_softmax's backward returns is cast back to the logits'
    # dtype (ToCopyBackward0), and that tensor is what the LM head's two matmuls read
    upcast = setup.loss is Loss.CAUSAL_LM and not setup.semantics.loss_copies_shifted_logits and p < FP32
    logits_grad = p * TV if upcast else 0
    ranked = st.ranked
    ws = st.workspace
    return StepTerms(
        weights=weights, staging=staging, dropped=_dropped_head(spec, setup), layers=L, head_grad=head,
        root_grads=root,
        tied=bool(spec.tie_word_embeddings) and full, embed_grad=embed, embed_other=embed_other,
        states=states, masters=masters, master_grads=master_grads, temps=temps, temps_at_once=at_once,
        blocks=blk, recompute=recompute, outside=tuple(outside), embed_out=resid * spec.hidden_size * T,
        logits_fwd=tuple(logits_fwd), logits_saved=saved, logits_bwd=tuple(logits_bwd), logits_grad=logits_grad,
        head_input_grad=p * e * T, casts_head=head_cast,
        workspaces=(ws // 2, ws - ws // 2) if ws else (),
        buckets=ranked.buckets, gather=ranked.layer_params if ranked.gathers else 0,
        gather_root=ranked.root_params if ranked.gathers else 0,
        reduce=ranked.layer_reduce_input if ranked.gathers else 0,
        grad_accum=setup.grad_accum, keep_grads=setup.keep_grads,
        manual=setup.loop in (Loop.MANUAL, Loop.HELD), held=setup.loop is Loop.HELD,
        optimizer=setup.optimizer is not Optimizer.NONE, empty_cache_steps=setup.empty_cache_steps)


# ---------------------------------------------------------------------- no-grad forwards
@dataclass(frozen=True)
class ForwardTerms:
    """An evaluation forward's or a generation's trace terms (no autograd: every layer's
    tensors are transients, the KV cache the only thing a layer leaves)."""

    weights: tuple[Stack, ...]
    staging: Stack  # quantize-on-load: each quantized weight's 16-bit copy before it is packed
    dropped: int  # Load.CONFIG: a tied head's own weight, made and dropped at tie_weights()
    layers: int
    w: Widths
    T: int
    batch: int
    square: int  # one (b, a, s, s) eager score tensor
    cache: int  # one layer's key (and value) cache of the prompt, 0 without a cache
    cache_token: int  # one layer's key (and value) cache of one token
    new_tokens: int
    logits: tuple[int, ...]  # at the loss (eval) or the prefill's end (generation)
    logits_decode: int
    workspaces: tuple[int, ...]
    empty_cache_steps: int
    decode: bool


def _layer_nograd(tr: Trace, w: Widths, T: int, square: int, resid: int, cache: list[int],
                  cache_bytes: int) -> int:
    """One decoder layer's forward under no_grad; returns the new residual stream."""
    a, f = tr.a, tr.f
    p = w.p
    # attention: the norm (fp32 working copy, normed input), q, k, v, the rotated q and k
    # (the rotated k and the v become the cache), the kernel's output, the output projection
    n = a(FP32 * w.h * T)
    y = a(p * w.h * T)
    f(n)
    q, k, v = a(w.q * p * T), a(w.kv * p * T), a(w.kv * p * T)
    q2, k2 = a(w.q * p * T), a(w.kv * p * T)
    f(q, k)
    if cache_bytes:
        # DynamicLayer.update: torch.cat([keys, key_states]) onto an empty tensor at the
        # first call, so the cache is a copy of the rotated k and of v (cache_utils.py)
        cache += [a(cache_bytes), a(cache_bytes)]
    s = a(square)
    s2 = a(square)
    f(s)
    o = a(w.q * p * T)
    f(s2, q2, k2, v)
    out = a(p * w.h * T)
    f(o, y)
    r = a(w.resid * w.h * T)
    f(out, resid)
    # MLP: the norm, gate and up (or one gate_up), act(gate), the product, the down projection
    n = a(FP32 * w.h * T)
    y = a(p * w.h * T)
    f(n)
    g = a(w.f * p * T * (2 if w.fused_mlp else 1))
    u = a(w.f * p * T) if not w.fused_mlp else -1
    act = a(w.f * p * T)
    prod = a(w.f * p * T)
    f(g, u, act)
    d = a(p * w.h * T)
    f(prod, y)
    r2 = a(w.resid * w.h * T)
    f(d, r)
    return r2


def forward_trace(t: ForwardTerms, steps: int = STEPS) -> Trace:
    """The load and ``steps`` evaluation forwards (or generations: a prefill that builds the
    cache, then ``new_tokens`` decode steps that grow it by ``torch.cat``)."""
    tr = Trace()
    a, f, many, free_all = tr.a, tr.f, tr.many, tr.free_all
    tr.begin(0, LOAD)
    L = t.layers
    load(tr, t.weights, t.staging, L, t.dropped)
    tr.end(0, LOAD)
    phase = "prefill" if t.decode else "forward"
    for step in range(steps):
        if step and t.empty_cache_steps and step % t.empty_cache_steps == 0:
            tr.empty_cache()
        tr.begin(step, phase)
        if not step:  # the handle's workspace, at the first matmul (Trace.matmul)
            tr.pending = t.workspaces
        cache: list[int] = []
        x = a(t.w.resid * t.w.h * t.T)
        tr.matmul()
        resid = a(t.w.resid * t.w.h * t.T)
        for _ in range(L):
            resid = _layer_nograd(tr, t.w, t.T, t.square, resid, cache, t.cache)
        logits = many(t.logits)
        free_all(logits)
        f(resid, x)
        tr.end(step, phase)
        for i in range(t.new_tokens if t.decode else 0):
            tr.begin(step, "decode")
            grown = []
            for c in range(0, len(cache), 2):  # DynamicCache.update: cat the new token's key and value
                old_k, old_v = cache[c], cache[c + 1]
                nk = a(t.cache + (i + 1) * t.cache_token)
                nv = a(t.cache + (i + 1) * t.cache_token)
                f(old_k, old_v)
                grown += [nk, nv]
            cache = grown
            f(a(t.logits_decode))
            tr.end(step, "decode")
        free_all(cache)
    return tr


def _dropped_head(spec, setup) -> int:
    """``Load.CONFIG``: a tied LM head's own weight, allocated with the module and freed when
    ``tie_weights()`` points it at the embedding (0 otherwise)."""
    from .setup import Load, Quant
    if setup.load is not Load.CONFIG or not spec.tie_word_embeddings:
        return 0
    bytes_ = 2 if setup.quant is not Quant.NONE else setup.precision.param_bytes
    return spec.vocab_size * (spec.embed_dim or spec.hidden_size) * bytes_


def _widths(spec, setup) -> Widths:
    from .archs import MLP, traits
    from .kernels import fused_qkv
    p = setup.precision.compute_bytes
    autocast = setup.precision.is_autocast
    resid, lin = (FP32, 2) if autocast else (p, p)
    experts = spec.experts_per_token if spec.num_experts else 1
    return Widths(spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size * experts, p, resid, lin,
                  traits(spec, setup).mlp is MLP.GATED_FUSED, fused_qkv(spec, setup))


def _square(spec, setup) -> int:
    """One (b, a, s, s) score tensor of eager attention (0 for the fused kernels)."""
    from .kernels import eager_softmax_bytes
    if setup.attn.value != "eager":
        return 0
    return eager_softmax_bytes(spec, setup) * spec.num_heads * setup.batch * setup.seq ** 2


def model_weights(spec, setup, weight_bytes: int) -> tuple[Stack, Stack]:
    """The parameter tensors in load order, in bytes on this rank (scaled so that they sum
    to the estimate's weights), and each one's 16-bit staging copy where bitsandbytes
    quantizes it on load (``Params4bit`` / ``Int8Params`` ``.to(device)``: the 16-bit
    weight goes to the device first and is packed there, bitsandbytes/nn/modules.py)."""
    from .setup import Quant
    emb, layer, final = inventory_bytes(spec)
    L = spec.num_layers
    if setup.quant is Quant.NONE:
        per = [x for x, _ in layer]
        stage = [0] * len(per)
    else:
        packed = 1.0 if setup.quant is Quant.INT8 else 0.5  # LLM.int8 / two 4-bit values a byte
        quantized = [g in ("attention", "mlp") for _, g in layer]
        per = [x * packed if q else 2 * x for (x, _), q in zip(layer, quantized)]
        stage = [2 * x if q else 0 for (x, _), q in zip(layer, quantized)]
    half = 2 if setup.quant is not Quant.NONE else 1
    base = Stack(tuple(x * half for x in emb), tuple(per), tuple(x * half for x in final))
    unit = sum(base.expand(L))
    scale = weight_bytes / max(unit, 1) if setup.quant is not Quant.NONE else 1.0
    return base.scaled(scale), Stack(layer=tuple(stage))


def forward_terms(spec, setup, st, k: float) -> ForwardTerms:
    """An evaluation's or a generation's trace terms from the estimate's (``st``)."""
    from .archs import traits
    from .setup import Loss, Mode, Quant
    T, V, p = setup.batch * setup.seq, spec.vocab_size, setup.precision.compute_bytes
    w = _widths(spec, setup)
    if setup.quant is Quant.NONE:
        emb, layer, final = inventory_bytes(spec)
        unit = sum(emb) + spec.num_layers * sum(x for x, _ in layer) + sum(final)
        weights = Stack(tuple(emb), tuple(x for x, _ in layer), tuple(final)).scaled(st.weights / max(unit, 1))
        staging = Stack()
    else:
        weights, staging = model_weights(spec, setup, st.weights)
    decode = setup.mode is Mode.INFERENCE
    cache = w.kv * p * T if (decode or setup.use_cache) else 0
    TV = T * V
    soft = p * TV if spec.logit_softcap else 0
    if decode:
        tr_ = traits(spec, setup)
        if tr_.prefill_full_logits:
            logits = (p * TV,) + ((FP32 * TV,) if tr_.prefill_logits_fp32 and p != FP32 else ())
        else:
            logits = (setup.batch * V * p,)
    elif setup.loss is Loss.LOGITS_SUM:
        logits = (p * TV,) + ((soft,) if soft else ())
    else:
        logits = (p * TV,) + ((FP32 * TV,) if p != FP32 else ()) + ((soft,) if soft else ()) + (FP32 * TV,)
    logits = tuple(int(x * k) for x in logits)
    ws = st.workspace
    return ForwardTerms(weights=(weights,), staging=staging, dropped=_dropped_head(spec, setup),
                        layers=spec.num_layers, w=w, T=T, batch=setup.batch,
                        square=int(_square(spec, setup) * k), cache=cache, cache_token=w.kv * p * setup.batch,
                        new_tokens=setup.new_tokens, logits=logits, logits_decode=setup.batch * V * p,
                        workspaces=(ws,) if ws else (), empty_cache_steps=setup.empty_cache_steps, decode=decode)


@lru_cache(maxsize=2048)
def replay_estimate(spec, setup, st, k: float, capacity_bytes: int | None = None) -> Replay:
    """The estimate's allocation sequence for ``setup`` replayed under its allocator
    settings (``Setup.alloc_conf``), with a card of ``capacity_bytes`` when given."""
    if setup.training:
        trace = training_trace(step_terms(spec, setup, st, k))
    else:
        trace = forward_trace(forward_terms(spec, setup, st, k))
    return replay(trace.events, setup.allocator, capacity_bytes)
