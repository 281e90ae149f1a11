"""Per-rank memory under data parallelism: the model states each rank keeps, and the
buffers each scheme adds at each moment of a step. Pure arithmetic on ints (no torch).

Schemes and sources
-------------------
ZeRO (Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", Sec. 5.1, Table 1; Ψ parameters, K = 12 bytes/param of optimizer state
for mixed-precision Adam, N ranks). Per rank:

=========  =====================  =====================================
stage      mixed-precision Adam   in general (here)
=========  =====================  =====================================
zero1      4Ψ + 12Ψ/N             optimizer state / N
zero2      2Ψ + 14Ψ/N             optimizer state and gradients / N
zero3      16Ψ/N                  optimizer state, gradients and weights / N
=========  =====================  =====================================

DeepSpeed's stage docs (deepspeed.readthedocs.io, "ZeRO": stage 1 partitions optimizer
states, 2 adds gradients, 3 adds parameters) say the same. The resident figures for
zero1/2/3 are exactly Table 1, with ceil division per term (DeepSpeed pads each flattened
partition to a multiple of N: within N-1 elements per tensor). DeepSpeed's communication
buckets (``reduce_bucket_size``, ``allgather_bucket_size``) are not modelled for
zero1/zero2; zero3 takes FSDP2's gathering moments below (parameters fetched per decoder
layer with one layer of prefetch), since it is measured as FSDP2 here.

DDP (``torch.nn.parallel.DistributedDataParallel``; ``torch/nn/parallel/distributed.py``,
``torch/csrc/distributed/c10d/reducer.cpp``). The Reducer puts every trainable parameter
in exactly one flat bucket (``bucket_cap_mb=25``, the first bucket capped at
``dist._DEFAULT_FIRST_BUCKET_BYTES`` = 1 MiB), allocated when DDP is built and kept for
the life of the model: the buckets together are one gradient-sized buffer, resident in
every phase, forward included. With ``gradient_as_bucket_view=False`` (the default)
``mark_variable_ready_dense`` copies each ``.grad`` into its bucket, so the gradients
exist twice; with ``True`` ``.grad`` is a view of the bucket and exists once.

FSDP2 (``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on the root;
``torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py`` and ``_fsdp_collectives.py``,
torch 2.13). Every parameter, gradient and optimizer state is sharded /N: each tensor is
chunked on dim 0 and padded to ceil(rows/N) rows (``FSDPParam._init_sharded_param``), so
rank 0 holds sum(ceil(rows/N) * cols) elements and an all-gather buffer is N times that --
which is why per-rank memory can grow by a few rows from N to N+1 ranks. Besides the
shards (measured under ``torchrun`` with gloo and as rank 0 of a fake process group,
``profiler/distributed.py``):

- the root group (embeddings, final norm, LM head) keeps its unsharded parameters from
  the root's pre-forward to its post-backward (``reshard_after_forward`` is False for the
  root, ``fully_shard`` docstring), and its unsharded gradients from the LM head's
  backward until the root's reduce-scatter at the very end of backward; with a large
  root (GPT-2's tied embeddings) a rank of 2 can need more than one unsharded device;
- forward: a layer's all-gather output buffer and its unsharded parameters coexist, and
  while a layer's parameters are copied out of its buffer the previous layer's buffer is
  still referenced (``wait_for_unshard``): three layer-sized buffers at a copy-out, two
  while the layer runs;
- backward: a layer's unsharded parameters, the next layer's all-gather buffer (one
  layer of backward prefetch, ``_backward_prefetch``) and the previous layer's
  reduce-scatter input (``reduce_scatter_states``, ``reduce_scatter_max_input_buffers``
  = 1): three layer-sized buffers inside the middle layers, plus the layer's unsharded
  gradients before ``foreach_reduce`` copies them into the reduce-scatter input.

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, what ``accelerate launch`` with an
FSDP config and the Trainer run: one unit per decoder layer, the root unit owning the rest,
``use_orig_params=True``, ``BACKWARD_PRE`` prefetch; torch 2.13
``torch/distributed/fsdp/_flat_param.py``, ``_runtime_utils.py``). Each unit flattens its
parameters into one FlatParameter: with ``use_orig_params`` every parameter starts on a
16-byte boundary (``_get_aligned_numel``, _flat_param.py:2771) and the whole is padded to a
multiple of N (_flat_param.py:762), so every rank holds exactly flat/N elements per unit.
Unlike FSDP2 there is no copy-out: the all-gather writes the padded unsharded flat parameter
whose storage FSDP1 grows and frees in place (``_alloc_storage``/``_free_storage``), and the
module's parameters are views of it. So, per rank (measured under ``torchrun`` with gloo):

- forward: the root's unsharded flat parameter from its pre-forward to the end of backward
  (``_post_forward_reshard`` keeps the root's, _runtime_utils.py) and one layer's;
- backward: the current layer's and the prefetched next layer's unsharded parameters; the
  parameters' gradients arrive as separate tensors and become the flat gradient at once
  when autograd reaches the views' split (``split_with_sizes`` backward concatenates them),
  so at a unit's end both exist (plus the reduce-scatter's output shard, ``_reduce_grad``);
  the root's flat gradient forms only at the very end, beside its parameters' gradients;
- SHARD_GRAD_OP (``fsdp1-shard-grad-op``) frees no unsharded parameters after forward
  (``_post_forward_reshard``: not in RESHARD_AFTER_FORWARD_HANDLE_STRATEGIES): every layer's
  unsharded flat parameter lives from its forward to its post-backward.
- LoRA: peft's ``fsdp_auto_wrap_policy`` (the Trainer applies it, transformers trainer.py
  ``_fsdp_qlora_plugin_updates``) makes every lora_A / lora_B its own unit, so the frozen base
  units have no gradient and each adapter is padded to a multiple of N on its own.

LoRA / QLoRA: only the adapters are trainable, so only their gradients and optimizer
states exist to shard (or to bucket under DDP); the frozen base weights shard under
zero3 / fsdp, and the root group then has no gradients.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .activations import sink_attention_left, sink_attention_working, stream_bytes, training_activations
from .archs import inventory_of, traits
from .kernels import cuda_sdpa_backend, eager_softmax_bytes, eager_softmax_saved
from .modelspec import ModelSpec
from .params import count_params, layer_linears, lora_targets, quant_state_bytes
from .setup import Attention, Device, Mode, Quant, Setup, Sharding
from .units import FP32, HALF, MiB

#: The largest world any search or estimate here considers.
MAX_WORLD_SIZE = 1024
#: DDP's bucket limits: ``bucket_cap_mb=25`` (torch/nn/parallel/distributed.py) and a first
#: bucket of ``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`` = 1 MiB (c10d reducer.hpp).
DDP_BUCKET_CAP_BYTES = 25 * MiB
DDP_FIRST_BUCKET_BYTES = MiB
_FLAT = (Sharding.FSDP1, Sharding.FSDP1_GRAD_OP)  # FSDP1: one flat parameter per unit
_GATHERING = (Sharding.ZERO3, Sharding.FSDP) + _FLAT  # parameters sharded, gathered per layer
#: FSDP1 with ``use_orig_params=True`` starts every parameter on this many bytes
#: (torch/distributed/fsdp/_flat_param.py ``_get_aligned_numel``: ALIGNMENT = 16).
FSDP1_ALIGNMENT_BYTES = 16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RankStates:
    """Bytes on one rank: the resident shards, and the transient buffers of the scheme.

    ``weights + gradients + optimizer_state`` is the ZeRO paper's per-rank model state
    (Table 1). The other fields are the scheme's buffers; the methods turn them into the
    extra bytes (category name -> bytes) present at each moment :func:`estimate` models.
    """

    sharding: Sharding
    world_size: int
    weights: int
    gradients: int  # .grad as it sits on the rank after backward (sharded under zero2/3, fsdp)
    optimizer_state: int
    buckets: int = 0  # DDP Reducer's flat gradient buckets, resident through the whole step
    root_params: int = 0  # FSDP2 root group's unsharded parameters (held in forward and backward)
    layer_params: int = 0  # one decoder layer's unsharded parameters = its all-gather buffer
    layer_grads: int = 0  # one decoder layer's unsharded gradients (before the reduce-scatter)
    layer_grad_shard: int = 0  # one decoder layer's gradient shard (after it)
    root_grads: int = 0  # the root group's unsharded gradients, all of them (end of backward)
    head_grads: int = 0  # the part present while the decoder layers run backward (LM head, final norm)
    layers: int = 0
    root_grad_shard: int = 0  # FSDP1: the root unit's gradient shard (made at the very end of backward)
    root_view_grads: int = 0  # FSDP1: root parameters' gradients beyond the embedding terms the caller adds
    head_weight_grad: int = 0  # FSDP1: the LM head's weight gradient, a tensor of its own until the end
    largest_view: int = 0  # FSDP1: elements of the largest piece of one trainable parameter on rank 0
    tied_sum: int = 0  # FSDP2 / ZeRO-3: a tied embedding's summed gradient at the end of backward

    @property
    def model_states(self) -> int:
        """Resident per-rank model states (ZeRO Table 1)."""
        return self.weights + self.gradients + self.optimizer_state

    @property
    def layer_reduce_input(self) -> int:
        """FSDP2's reduce-scatter input of one layer: its padded unsharded gradients."""
        return self.world_size * self.layer_grad_shard

    @property
    def gathers(self) -> bool:
        return self.sharding in _GATHERING

    @property
    def flat(self) -> bool:
        """FSDP1: flat parameters, gathered in place, gradients concatenated per unit."""
        return self.sharding in _FLAT

    @property
    def kept_layers(self) -> int:
        """Layers whose unsharded parameters stay from forward to backward: all of them under
        SHARD_GRAD_OP, none otherwise."""
        return self.layers if self.sharding is Sharding.FSDP1_GRAD_OP else 0

    @property
    def last_layer_params(self) -> int:
        """Unsharded layer parameters when backward starts: the last layer's (prefetched by
        the root's pre-backward, or still there after its forward), every layer's if kept."""
        return max(self.layer_params, self.kept_layers * self.layer_params)

    def forward_extra(self) -> dict[str, int]:
        """Extra bytes at the forward's loss, beside the activations and the logits: DDP's
        buckets; FSDP2's root parameters and the last layer's all-gather buffer (the loss is
        computed inside the root's forward; the root's post-forward frees that buffer)."""
        out = {"gradients": self.buckets} if self.buckets else {}
        if self.flat:  # the last layer resharded at its post-forward (unless kept)
            out["temporaries"] = self.root_params + self.kept_layers * self.layer_params
        elif self.gathers:
            out["temporaries"] = self.root_params + self.layer_params
        return out

    def forward_layer(self, saved: int, per_layer: int, working_set: int = 0) -> dict[str, int] | None:
        """FSDP2's forward peak among the decoder layers (``None`` for the other schemes).

        ``saved``: activations held after the last layer's forward; ``per_layer``: what one
        layer adds to them; ``working_set``: a layer's transient on top (a checkpointed
        layer's full activations, which it drops at its end). Moments (weights-free
        categories, as :meth:`backward_layer`):

        - the last layer's copy-out: the previous layer's all-gather result is still
          referenced while the current one is copied out (``wait_for_unshard`` binds it to a
          local), so two all-gather buffers and the unsharded parameters: three layers;
        - the first layer's copy-out: the root's all-gather buffer and parameters instead;
        - the end of the last layer: its all-gather buffer and parameters, all activations.
        """
        if not self.gathers:
            return None
        L, P, R = self.layers, self.layer_params, self.root_params

        def at(activations: int, temporaries: int) -> dict[str, int]:
            return {"activations": max(0, activations), "gradients": self.buckets, "temporaries": temporaries}

        if self.flat:  # FSDP1 gathers in place: the last layer's parameters (all, if kept) at its end
            return at(saved + working_set, R + self.last_layer_params)

        moments = [at(0, 2 * R + 2 * P), at(saved + working_set, R + 2 * P)]
        if L >= 2:
            moments.append(at(saved - per_layer, R + 3 * P))
        return max(moments, key=lambda m: sum(m.values()))

    def backward_loss_extra(self) -> dict[str, int]:
        """At the loss's backward: the root parameters and the last layer's prefetched
        all-gather buffer (the root's pre-backward prefetches it)."""
        out = {"gradients": self.buckets} if self.buckets else {}
        if self.gathers:
            out["temporaries"] = self.root_params + self.last_layer_params
        return out

    def backward_head_extra(self) -> dict[str, int]:
        """At the LM head's backward (FSDP1, FSDP2, ZeRO-3): the root's and the last layer's
        (prefetched, or kept) unsharded parameters, and the head's weight gradient: under
        FSDP1 a tensor of its own until the root's views are concatenated at the end, under
        FSDP2 the unsharded .grad (or, accumulating, the new gradient added into it); none
        under LoRA."""
        return {"temporaries": self.root_params + self.last_layer_params + self.head_weight_grad}

    def backward_end_extra(self) -> dict[str, int]:
        """At the end of backward, beside the resident gradient shards.

        FSDP2: before the root's post-backward, the root's unsharded parameters, its
        unsharded gradients and the first layer's reduce-scatter input; then the root's
        gradients and their reduce-scatter input (parameters resharded) -- the larger.
        """
        out = {"gradients": self.buckets} if self.buckets else {}
        if self.flat:
            # before the root's reduce-scatter: its unsharded parameters, its parameters'
            # gradients (the caller's embedding terms) and their concatenation, the flat
            # gradient; the root's shard does not exist yet
            out["gradients"] = -self.root_grad_shard
            out["temporaries"] = self.root_params + self.root_grads + self.root_view_grads
        elif self.gathers and self.tied_sum:
            # a tied embedding matrix: autograd sums the head's and the embedding's gradients
            # before AccumulateGrad makes .grad (the caller counts those two; the sum is here),
            # beside the root's parameters and the first layer's reduce-scatter input; the
            # root's unsharded .grad and its shard come after (measured: GPT-2, 2 ranks)
            out["gradients"] = -self.root_grad_shard
            out["temporaries"] = self.root_params + self.layer_reduce_input + self.tied_sum
        elif self.gathers:
            out["gradients"] = self.root_grads
            out["temporaries"] = max(self.root_params + self.layer_reduce_input, self.root_grads)
        return out

    def backward_layer(self, saved: int, per_layer: int, working_set: int,
                       recomputed: int = 0) -> dict[str, int] | None:
        """FSDP2's backward peak inside a decoder layer (``None`` for the other schemes).

        ``saved``: activations held when backward reaches the last layer; ``per_layer``:
        what each layer's backward frees of them; ``working_set``: a layer backward's own
        transient (:func:`layer_working_set`); ``recomputed``: a checkpointed layer's
        recomputed activations. Returns weights-free categories (weights and optimizer
        state are the resident shards, added by the caller). Layer i (L-1 first) holds
        ``saved - (L-1-i)*per_layer`` activations and ``L-1-i`` gradient shards; the moments
        are linear in i, so the end points of each range suffice.
        """
        if not self.gathers:
            return None
        L, P, RS = self.layers, self.layer_params, self.layer_reduce_input

        def at(i: int, params: int, reduce_inputs: int, transient: int) -> dict[str, int]:
            done = L - 1 - i
            return {"activations": max(0, saved - done * per_layer) + recomputed + transient,
                    "gradients": self.buckets + self.head_grads + done * self.layer_grad_shard,
                    "temporaries": self.root_params + params * P + reduce_inputs * RS}

        if self.flat:
            return self._flat_backward_layer(saved, per_layer, working_set, recomputed)
        if L == 1:  # copy-out (all-gather buffer + parameters), or its backward (parameters)
            moments = [at(0, 2, 0, 0), at(0, 1, 0, working_set)]
        else:
            moments = [
                at(L - 1, 2, 0, working_set),  # parameters + the next layer's prefetched all-gather buffer
                at(0, 2, 1, 0),  # copy-out: all-gather buffer + parameters + layer 1's reduce-scatter input
                at(0, 1, 1, working_set),  # its backward: nothing left to prefetch
            ]
            if L >= 3:  # middle layers: parameters + prefetch + the previous reduce-scatter input
                moments += [at(L - 2, 2, 1, working_set), at(1, 2, 1, working_set)]
        return max(moments, key=lambda m: sum(m.values()))

    def _flat_backward_layer(self, saved: int, per_layer: int, working_set: int,
                             recomputed: int) -> dict[str, int]:
        """FSDP1's backward moments in layer i (L-1 first): inside its backward (working set)
        and at its end, when its parameters' gradients and their concatenation coexist
        (the flat gradient, then the reduce-scatter's output shard, smaller). Unsharded
        parameters: the layer's and the prefetched next one's (BACKWARD_PRE), or under
        SHARD_GRAD_OP layers 0..i (each kept since its forward)."""
        L, P, G = self.layers, self.layer_params, self.layer_grads

        def at(i: int, activations: int, transient: int) -> dict[str, int]:
            done = L - 1 - i
            params = i + 1 if self.kept_layers else (2 if i > 0 else 1)
            return {"activations": max(0, activations - done * per_layer),
                    "gradients": self.head_grads + done * self.layer_grad_shard,
                    "temporaries": self.root_params + params * P + transient}

        moments = []
        for i in sorted({L - 1, min(1, L - 1), 0}):
            moments.append(at(i, saved + recomputed + working_set, 0))
            moments.append(at(i, saved - per_layer, 2 * G))
        return max(moments, key=lambda m: sum(m.values()))

    def optimizer_extra(self) -> dict[str, int]:
        return {"gradients": self.buckets} if self.buckets else {}

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["sharding"] = self.sharding.value
        out["model_states"] = self.model_states
        return out


def ddp_bucket_sizes(grad_bytes: Sequence[int], cap: int = DDP_BUCKET_CAP_BYTES,
                     first: int = DDP_FIRST_BUCKET_BYTES) -> list[int]:
    """Bytes of each DDP bucket for gradients of ``grad_bytes`` (in ``model.parameters()``
    order): the Reducer fills buckets in reverse order, closing one once it reaches its
    limit (``_compute_bucket_assignment_by_size``: ``first``, then ``cap``). The buckets
    always sum to the gradients -- the cap sets how many, not how much."""
    sizes: list[int] = []
    current, limit = 0, first
    for nbytes in reversed(list(grad_bytes)):
        current += nbytes
        if current >= limit:
            sizes.append(current)
            current, limit = 0, cap
    if current:
        sizes.append(current)
    return sizes


def with_extra(extra: dict[str, int], **parts: int) -> dict[str, int]:
    """``parts`` (category name -> bytes) plus ``extra``: ``phase(n, **with_extra(x, weights=W))``."""
    if extra:
        for key, value in extra.items():
            parts[key] = parts.get(key, 0) + value
    return parts


def per_rank_states(spec: ModelSpec, setup: Setup, states, gradient_as_bucket_view: bool = False) -> RankStates:
    """Per-rank bytes of ``states`` (an ``estimate.ModelStates``: unsharded weights,
    gradients, optimizer state, trainable count) under ``setup.sharding`` over
    ``setup.world_size`` ranks. ``gradient_as_bucket_view``: DDP's option of that name."""
    return _per_rank(spec, setup.shape_free, states.weights, states.gradients, states.optimizer_state,
                     states.trainable, bool(gradient_as_bucket_view))


@lru_cache(maxsize=4096)
def _per_rank(spec: ModelSpec, key: Setup, w: int, g: int, o: int, trainable: int,
              bucket_view: bool) -> RankStates:
    n, sh = key.world_size, key.sharding
    param_bytes = key.precision.param_bytes
    if not 1 <= n <= MAX_WORLD_SIZE:
        raise ValueError(f"world size {n} is outside 1..{MAX_WORLD_SIZE}")
    if sh is Sharding.NONE:
        return RankStates(sh, n, w, g, o)
    if sh is Sharding.DDP:
        # every trainable parameter sits in one bucket; .grad is a bucket view or a second copy
        return RankStates(sh, n, w, 0 if bucket_view else g, o, buckets=g)
    if sh is Sharding.ZERO1:
        return RankStates(sh, n, w, g, _ceil_div(o, n))
    if sh is Sharding.ZERO2:
        return RankStates(sh, n, w, _ceil_div(g, n), _ceil_div(o, n))
    if sh in _FLAT:
        flat = _fsdp1_states(spec, key, g, o, trainable)
        if flat is not None:
            return flat
    # zero3 / fsdp: everything sharded, parameters gathered a decoder layer at a time
    # (FSDP1 without per-tensor shapes: even shards, as zero3)
    L = max(spec.num_layers, 1)
    root_elems, root_bytes = _root_group(spec, key)
    full = key.mode is Mode.FULL
    grad_bytes = g // max(trainable, 1)
    # FSDP2 pads per tensor row (below); DeepSpeed's ZeRO-3 partitions each flattened
    # parameter (stage3.py: numel padded to a multiple of N), which is even shards to
    # within N-1 elements per tensor: Table 1 with ceil division per term
    shapes = _dim0_shapes(spec) if key.quant is Quant.NONE and sh is Sharding.FSDP else None
    if shapes is None:  # even shards (zero3, quantized storage, no formula): ceil per total
        # bitsandbytes' quantization state is no parameter: every rank keeps all of it
        # (params.quant_state_bytes); the packed weights (in bnb_4bit_quant_storage, what
        # QLoRA under FSDP sets so they flatten beside the 16-bit modules) shard
        state = quant_state_bytes(spec, key.quant, key.semantics.moe_experts_fused)
        w_rank, g_rank, o_rank = _ceil_div(w - state, n) + state, _ceil_div(g, n), _ceil_div(o, n)
        layer_params = _ceil_div(max(w - state - root_bytes, 0), L)
        layer_grads = _ceil_div(max(trainable - root_elems, 0), L) * grad_bytes if full else _ceil_div(g, L)
        layer_grad_shard = _ceil_div(layer_grads, n)
    else:
        # FSDP2 chunks every tensor on dim 0 and pads the chunks to ceil(rows/N) rows
        # (FSDPParam._init_sharded_param, _get_dim0_padded_size); rank 0 holds full chunks
        root, layer = shapes
        root_shard, layer_shard = _shard_elems(root, n), _shard_elems(layer, n)
        base_shard = root_shard + L * layer_shard
        adapters = _ceil_div(trainable, L) if not full else 0  # per layer; lora_A (r, in), lora_B (out, r)
        adapter_shard = 0 if full else _shard_elems(_lora_shapes(spec, key, adapters), n)
        w_rank = base_shard * param_bytes + L * adapter_shard * FP32
        trainable_shard = base_shard if full else L * adapter_shard
        g_rank = trainable_shard * grad_bytes
        o_rank = _ceil_div(o * trainable_shard, max(trainable, 1))
        layer_params = n * (layer_shard * param_bytes + adapter_shard * FP32)  # the padded all-gather
        layer_grads = (_layer_elems(spec) if full else adapters) * grad_bytes
        layer_grad_shard = (layer_shard if full else adapter_shard) * grad_bytes
        root_bytes = n * root_shard * param_bytes
    tied = head = 0
    if full:
        head = _head_matrix(spec) * grad_bytes
        root_grads = root_elems * grad_bytes
        head_grads = _head_elems(spec, root_elems) * grad_bytes
        if spec.tie_word_embeddings:
            tied = head
    else:  # LoRA/QLoRA: adapters live in the decoder layers; the root group is frozen
        root_grads = head_grads = 0
    return RankStates(sh, n, w_rank, g_rank, o_rank, root_params=root_bytes, layer_params=layer_params,
                      layer_grads=layer_grads, layer_grad_shard=layer_grad_shard, root_grads=root_grads,
                      head_grads=head_grads, layers=L, root_grad_shard=_ceil_div(root_grads, n), tied_sum=tied,
                      head_weight_grad=head)


def _aligned_starts(sizes, align: int) -> tuple[list[int], int]:
    """Where each tensor of ``sizes`` elements starts in an FSDP1 FlatParameter under
    ``use_orig_params`` (each at a multiple of ``align`` elements), and the end of the last
    (_flat_param.py ``_init_flat_param_and_metadata``)."""
    starts, total = [], 0
    for size in sizes:
        total += (-total) % align
        starts.append(total)
        total += size
    return starts, total


def _flat_numel(sizes, align: int, n: int) -> int:
    """Elements of that FlatParameter: the aligned tensors, padded to a multiple of the
    world size (_flat_param.py:762)."""
    total = _aligned_starts(sizes, align)[1]
    return total + (-total) % n


def _rank0_pieces(sizes, align: int, n: int, rank: int = 0) -> list[int]:
    """Elements of each parameter inside rank ``rank``'s chunk (rank 0's by default) of their
    FSDP1 flat parameter (the views ``use_orig_params`` gives the optimizer, _flat_param.py
    ``_get_shard_metadata``)."""
    chunk = _flat_numel(sizes, align, n) // n
    lo, hi = rank * chunk, (rank + 1) * chunk
    starts, _ = _aligned_starts(sizes, align)
    return [max(0, min(start + size, hi) - max(start, lo)) for start, size in zip(starts, sizes)]


def _fsdp1_states(spec: ModelSpec, key: Setup, g: int, o: int, trainable: int) -> RankStates | None:
    """Per-rank states and buffers under FSDP1 (module docstring): a flat parameter per
    decoder layer and one for the root; under LoRA one per adapter matrix (peft's wrap
    policy), fp32. ``None`` where the per-tensor shapes are not known (quantized storage,
    no formula): the caller shards evenly then."""
    shapes = _dim0_shapes(spec) if key.quant is Quant.NONE else None
    if shapes is None:
        return None
    n, L, pb = key.world_size, max(spec.num_layers, 1), key.precision.param_bytes
    root, layer = ([rows * cols for rows, cols in group] for group in shapes)
    if key.layer_units:
        return _fsdp1_layer_unit_states(spec, key, g, o, trainable, root, layer)
    root_flat = _flat_numel(root, FSDP1_ALIGNMENT_BYTES // pb, n)
    layer_flat = _flat_numel(layer, FSDP1_ALIGNMENT_BYTES // pb, n)
    full = key.mode is Mode.FULL
    grad_bytes = g // max(trainable, 1)
    adapters = [] if full else [rows * cols for rows, cols in _lora_shapes(spec, key, _ceil_div(trainable, L))]
    adapter_flat = sum(_flat_numel([size], 1, n) for size in adapters)  # one unit each: padding to N only
    base = root_flat + L * layer_flat
    trainable_shard = base // n if full else L * adapter_flat // n
    layer_grads = (layer_flat if full else adapter_flat) * grad_bytes
    head = _head_matrix(spec) * grad_bytes if full else 0
    # the caller's end-of-backward embedding terms (estimate._static embed_bwd): a tied
    # matrix's head and embedding gradients; the other root gradients are added here
    caller_terms = 2 * head if spec.tie_word_embeddings else 0
    root_grads = root_flat * grad_bytes if full else 0
    if full:
        largest = max(_rank0_pieces(root, FSDP1_ALIGNMENT_BYTES // pb, n)
                      + _rank0_pieces(layer, FSDP1_ALIGNMENT_BYTES // pb, n))
    else:
        largest = max((_flat_numel([size], 1, n) // n for size in adapters), default=0)
    return RankStates(
        key.sharding, n, base // n * pb + L * adapter_flat // n * FP32, trainable_shard * grad_bytes,
        _ceil_div(o * trainable_shard, max(trainable, 1)),
        root_params=root_flat * pb, layer_params=layer_flat * pb + adapter_flat * FP32, layer_grads=layer_grads,
        layer_grad_shard=layer_grads // n, root_grads=root_grads,
        head_grads=_head_elems(spec, sum(root)) * grad_bytes if full else 0, layers=L,
        root_grad_shard=root_grads // n, root_view_grads=max(0, sum(root) * grad_bytes - caller_terms) if full else 0,
        head_weight_grad=head, largest_view=largest)


def _fsdp1_layer_unit_states(spec: ModelSpec, key: Setup, g: int, o: int, trainable: int, root, layer) -> RankStates:
    """FSDP1 LoRA with one unit per decoder layer (``--fsdp-wrap layers``, setup.FsdpWrap): a
    layer's flat parameter holds its weights with peft's adapters in ``named_parameters()``
    order (peft LoraLayer: ``base_layer``'s weight and bias, then ``lora_A`` (r, in) and
    ``lora_B`` (out, r)), one dtype (fp32), each tensor aligned. The flat parameter requires a
    gradient, so its gradient is the whole flat parameter's (torch 2.13
    fully_sharded_data_parallel.py:208-213: "higher than expected gradient memory usage";
    measured), unsharded in the layer's backward, then its shard, which the
    frozen weights' gradient views keep after ``zero_grad`` until the next forward frees it
    (measured: gradients 0 in the second step's forward). The root's flat parameter is all
    frozen: no gradient. The optimizer holds state only for the adapters' pieces in a rank's
    chunk of each layer (``_rank0_pieces``), which differ by rank: the busiest rank's is
    taken (under q_proj,v_proj both adapters sit in the first half of a layer: rank 0 of 2
    holds all of them, rank 1 none; measured)."""
    n, L, pb = key.world_size, max(spec.num_layers, 1), key.precision.param_bytes
    align = FSDP1_ALIGNMENT_BYTES // pb
    inv = inventory_of(spec)
    ends = {}  # a targeted linear's last tensor -> its adapters' sizes
    for lin in lora_targets(spec, key.lora_targets):
        r = key.lora_rank * lin.lora_rank_multiplier()
        ends[f"{lin.name}.bias" if lin.bias else f"{lin.name}.weight"] = (r * lin.in_features, lin.out_features * r)
    sizes, is_adapter = [], []
    for t in inv.layer:
        sizes.append(t.elems)
        is_adapter.append(False)
        for size in ends.get(t.name, ()):
            sizes.append(size)
            is_adapter.append(True)
    root_flat, layer_flat = _flat_numel(root, align, n), _flat_numel(sizes, align, n)
    by_rank = [[piece for piece, adapter in zip(_rank0_pieces(sizes, align, n, rank), is_adapter) if adapter]
               for rank in range(n)]
    pieces = max(by_rank, key=sum)
    adapter_shard = sum(pieces)
    grad_bytes = g // max(trainable, 1)
    layer_grads = layer_flat * grad_bytes
    return RankStates(
        key.sharding, n, (root_flat + L * layer_flat) // n * pb, L * layer_grads // n,
        _ceil_div(o * L * adapter_shard, max(trainable, 1)), root_params=root_flat * pb,
        layer_params=layer_flat * pb, layer_grads=layer_grads, layer_grad_shard=layer_grads // n, layers=L,
        largest_view=max(pieces, default=0))


def _shard_elems(shapes, n: int) -> int:
    """Rank 0's elements of tensors of (rows, columns) chunked on dim 0 over n ranks."""
    return sum(_ceil_div(rows, n) * cols for rows, cols in shapes)


@lru_cache(maxsize=256)
def _dim0_shapes(spec: ModelSpec):
    """(rows, columns) of every parameter tensor: the root group's and one decoder layer's,
    in transformers' layouts (nn.Linear (out, in); GPT-2's Conv1D (in, out); fused MoE
    experts (E, ...)), from the family's inventory (estimator/archs). ``None`` for a model
    type without a formula."""
    if not spec.has_formula:
        return None
    return inventory_of(spec).dim0_shapes()


def _lora_shapes(spec: ModelSpec, key: Setup, adapters: int):
    """peft's adapters of one layer: lora_A (r, in) and lora_B (out, r) per targeted linear
    (peft LoraLayer); a flat block, evenly chunked, where peft's shapes are not known here
    (fused MoE experts under all-linear) or do not add up."""
    shapes = []
    for lin in lora_targets(spec, key.lora_targets):
        r = key.lora_rank * lin.lora_rank_multiplier()
        if lin.fused_experts:
            return ((adapters, 1),)
        shapes += [(r, lin.in_features), (lin.out_features, r)]
    if sum(rows * cols for rows, cols in shapes) != adapters:
        return ((adapters, 1),)
    return tuple(shapes)


def _layer_elems(spec: ModelSpec) -> int:
    """Parameters of one decoder layer: its matrices and its norms."""
    return inventory_of(spec).layer_elems


def _root_group(spec: ModelSpec, key: Setup):
    """(elements, bytes) of what ``fully_shard(model)`` owns beyond the decoder layers:
    embeddings (and learned positions, OPT's projections), the final norm and an untied
    LM head. Quantized models keep these in the 2-byte compute dtype (bitsandbytes)."""
    count = count_params(spec)
    elems = max(count.total - spec.num_layers * _layer_elems(spec), 0)
    per_elem = HALF if key.quant is not Quant.NONE else key.precision.param_bytes
    return elems, elems * per_elem


def _head_matrix(spec: ModelSpec) -> int:
    """Elements of the LM head's weight (vocab, embedding width)."""
    return spec.vocab_size * (spec.embed_dim or spec.hidden_size)


def _head_elems(spec: ModelSpec, root_elems: int) -> int:
    """Root parameters whose gradients exist from the start of backward: the LM head (the
    tied embedding matrix, when tied) and the final norm -- all but the input embeddings."""
    embeddings = count_params(spec).groups.get("embeddings", 0)
    if spec.tie_word_embeddings:
        return root_elems - embeddings + _head_matrix(spec)  # the shared matrix gets the head's gradient first
    return root_elems - embeddings


def layer_working_set(spec: ModelSpec, setup: Setup) -> int:
    """Bytes a decoder layer's backward holds beyond its saved activations, at the larger of
    two moments (read off the autograd ops of a Llama layer's backward, cpu and sim backends):

    - the MLP's backward: the output projection's weight gradient (when trainable), the
      gradients of the MLP's intermediate and of its pre-activation (b*s*f each) and, in a gated
      dense MLP, of its other branch: ``act(gate) * up``'s backward returns both factors' gradients
      while its input's is still alive (three b*s*f), beside the gradient of the layer's output
      arriving down the residual stream (b*s*h). Measured on the CUDA sim where a checkpointed
      layer's backward is the peak (SmolLM2 widths, 8 layers, LoRA q/v, b2 x s1024: a 2,048-word
      vocabulary under the HF Trainer's loop -5.09 -> -0.15 %; TRL's SFT with 256 completion
      tokens -3.34 -> -0.11 %);
    - the attention's backward, after the MLP's: every MLP weight gradient (a layer's
      gradients are reduce-scattered only after its whole backward) less the MLP's saved
      activations, now freed, plus the attention kernel's backward buffers -- eager
      softmax: the probabilities' gradient and the softmax backward output (b*a*s^2 each,
      fp32 where the model upcasts the softmax); fused kernels: the q, k, v gradients.

    It decides the peak only where a layer's backward is the peak: FSDP2 / ZeRO-3, or a
    checkpointed step whose head is small beside a layer (few scored rows, a small vocabulary)."""
    T, s = setup.batch * setup.seq, setup.seq
    down, mlp_grads, in_mlp, mlp_saved, attn_token, attn_square = _working_terms(spec, setup.shape_free)
    attn = attn_token * T + attn_square * setup.batch * s * s
    # LoRA on fused expert stacks: the gradient of the output projection's parametrized stack
    # (weight-sized, activations.lora_expert_weights), the first the layer's backward makes,
    # before baddbmm's backward reduces it to the factors (measured on the sim: Mixtral's down
    # stack beside the saved activations; the gate_up stack's comes once the MLP's are freed)
    stacks = [lin for lin in lora_targets(spec, setup.lora_targets) if lin.fused_experts] \
        if setup.mode in (Mode.LORA, Mode.QLORA) else []
    stack = stacks[-1].copies * stacks[-1].in_features * stacks[-1].out_features * setup.precision.param_bytes \
        if stacks else 0
    if setup.attn is Attention.EAGER and traits(spec, setup).attn_sinks and setup.mode is Mode.FULL:
        # eager attention with sinks (gpt-oss), full training: by its softmax's backward, after
        # every MLP weight gradient (LoRA keeps the eager terms above: -0.03 % there), every saved tensor of
        # the layer but what that backward still reads is freed, and its three (heads, s, s + 1)
        # buffers are there (activations.sink_attention_working; measured on the sim: gpt-oss 4
        # layers b2 x s1024 bf16 with checkpointing, +0.68 % with the eager terms above)
        act = training_activations(spec, setup)
        gone = act.layer_bytes - sink_attention_left(spec, act)
        return max(down + in_mlp * T + stack, mlp_grads - gone + sink_attention_working(spec, setup))
    return max(down + in_mlp * T + stack, mlp_grads - mlp_saved * T + attn)


@lru_cache(maxsize=1024)
def _working_terms(spec: ModelSpec, key: Setup):
    """The batch- and sequence-free coefficients of :func:`layer_working_set` (``key``: a
    :attr:`Setup.shape_free` setup, one token)."""
    f, p = spec.intermediate_size, key.precision.compute_bytes
    experts = spec.experts_per_token if spec.num_experts else 1
    grad = key.precision.param_bytes if key.trains_layer_weights else 0
    mlp = [lin for lin in layer_linears(spec) if lin.group == "mlp"]
    down = (mlp[-1].params // max(mlp[-1].copies, 1)) * experts * grad if mlp else 0
    mlp_grads = sum(lin.params for lin in mlp) * grad
    act = training_activations(spec, key)
    mlp_saved = act.per_layer.get("mlp", 0)
    # a dense gated MLP: three (T, f) and the stream's gradient (docstring); MoE experts keep two
    # (T x top-k, f) each (checked against the sim for Mixtral, Qwen3-MoE, gpt-oss with their own
    # terms; three puts Mixtral's checkpointed LoRA backward at +2.4 %)
    in_mlp = 2 * f * p * experts if spec.num_experts else \
        (3 if spec.gated_mlp else 2) * f * p + stream_bytes(key) * spec.hidden_size
    math = key.attn is Attention.SDPA and key.device is Device.CUDA and cuda_sdpa_backend(spec, key) == "math"
    if key.attn is Attention.EAGER or math:
        # sdpa's math kernel (a CUDA step's for grouped heads without flash or cuDNN: sm75; fp32)
        # is the eager composite inside one op: its backward makes the probabilities' gradient and
        # the softmax backward's output, (b, heads, s, s) fp32 each, beside the saved ones (measured
        # with the storage tracker on the op's backward alone: exactly two score matrices over what
        # it saved), at the same moment of the layer's backward as eager's below (measured on the
        # CUDA sim, SmolLM2-135M 8 layers fp32 full with checkpointing, TRL's chunked loss, b2 x
        # s1024, the first layer's: 95.0 MiB of saved tensors left and 153 MiB of these buffers
        # and gradients, to the 0.5 MiB; +1.4 % with the MLP's saved tensors alone taken off)
        probs = FP32 if math else eager_softmax_bytes(spec, key)  # the softmax output's dtype (activations.py)
        # the softmax's cast copy, saved for the value matmul, is released once that matmul's
        # backward has run, before the softmax's gradients exist (measured on the sim: SmolLM2-360M
        # eager fp16 and bf16 at s4096, a recomputed layer's backward)
        cast = p if not math and eager_softmax_saved(spec, key) > probs else 0
        # by the softmax's backward, every saved tensor of the layer but what attention's backward
        # still reads is freed (the MLP's, the post-attention norm's, the output projection's and
        # its adapter's inputs, v), and the residual stream's and the attention output's gradients
        # (T, h) and (T, heads x d) are there (the same moment as sink attention's,
        # activations.sink_attention_left; measured on the sim, SmolLM2-360M-L2 QLoRA eager with
        # checkpointing at s4096, where peft's fp32 stream doubles these: -1.11 % before)
        freed = act.layer_bytes - act.per_layer.get("attn_scores", 0) - sink_attention_left(spec, act)
        grads = stream_bytes(key) * spec.hidden_size + p * spec.q_dim
        return down, mlp_grads, in_mlp, freed, grads, (2 * probs - cast) * spec.num_heads
    return down, mlp_grads, in_mlp, mlp_saved, (spec.q_dim + 2 * spec.kv_dim) * p, 0


def smallest_world(spec: ModelSpec, setup: Setup, memory_bytes: int,
                   estimate_fn: Callable[[ModelSpec, Setup], object],
                   sharding: Sharding = Sharding.FSDP, powers_of_two: bool = False,
                   lower_bound: Callable[[ModelSpec, Setup], int] | None = None) -> int | None:
    """Fewest ranks (up to MAX_WORLD_SIZE; only powers of two when asked) whose per-rank
    ``estimate_fn(spec, setup).total_bytes`` fits ``memory_bytes`` under ``sharding``;
    ``None`` if none does. One rank is the setup as given (no sharding). A plain scan:
    FSDP2's padded all-gather buffers make per-rank memory not quite monotone in N (65
    ranks can need a little more than 64), so a bisection could miss the smallest."""
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    sharding = Sharding.parse(sharding)
    if sharding is Sharding.NONE:
        raise ValueError("smallest_world needs a sharding: ddp, zero1, zero2, zero3, fsdp, fsdp1 or "
                         "fsdp1-shard-grad-op")
    n = 1
    while n <= MAX_WORLD_SIZE:
        candidate = setup if n == 1 else setup.replace(world_size=n, sharding=sharding)
        # ``lower_bound``: a cheap figure the total cannot be under (the tensors and the
        # memory outside the allocator), so the full estimate runs only where it could fit
        if (lower_bound is None or lower_bound(spec, candidate) <= memory_bytes) \
                and estimate_fn(spec, candidate).total_bytes <= memory_bytes:
            return n
        n = 2 * n if powers_of_two else n + 1
    return None
