"""The sim backend's fidelity: fake tensors must allocate what a real step allocates.

A sim run builds the model on meta, materialises fake CPU tensors (``build.materialize_fake``)
and steps it under ``FakeTensorMode``. A fake "cuda" device is not an option on a
CPU-only torch (autograd's device guard aborts), so the tensors stay fake *CPU* tensors
and what differs between a CPU and a CUDA step is emulated here, inside the run only
(context managers entered around the steps, never left installed).

Both semantics
    Packed sequences (:func:`never_packed`). transformers'
    ``masking_utils.find_packed_sequence_indices`` cannot read a fake tensor's values, so
    ``is_tracing`` (true for fake tensors, ``utils/import_utils.py``) makes it return the
    packed-sequence mask instead of ``None``; ``_preprocess_mask_arguments`` then builds a
    full (b, 1, s, s) mask, sdpa loses ``enable_gqa`` (``integrations/sdpa_attention.py:
    use_gqa_in_sdpa`` needs no mask), ``repeat_kv`` copies K and V to every head and sdpa
    saves the mask per layer. The profiler's batches are synthetic and never packed.

CUDA semantics (:func:`cuda_semantics`, the sim's default ``--device cuda``), each from
the torch source (2.11-2.13):
    - sdpa runs the aten op torch's CUDA dispatcher would choose
      (``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``: ``select_sdp_backend``
      walks ``priority_order``: cuDNN first on sm90/sm100 when the runtime cuDNN is newer
      than 9.15.0, as in the PyPI cu13 wheels of torch >= 2.11 (cuDNN 9.19+), else flash,
      efficient, math; each backend's ``can_use_*`` filters: cuDNN and flash take fp16/bf16
      only, flash no mask, cuDNN head_dim <= 128 and dropout in multiples of 1/16,
      mem-efficient no grouped-query heads, math everything). Their meta kernels
      (``torch/_meta_registrations.py``) run on fake CPU tensors; the flash backward's own
      buffers, which its meta does not allocate (``flash_api.cpp: mha_bwd``: an fp32
      ``dq_accum``, ``softmax_d`` and, for grouped-query heads, full-head ``dk``/``dv``
      summed down), are allocated around it;
    - dropout as ``native_dropout`` with a bool mask (``aten/src/ATen/native/Dropout.cpp``:
      ``is_fused_kernel_acceptable`` is true on CUDA; the CPU path saves a noise tensor of
      the input's dtype);
    - autocast's CUDA cast policy (``aten/src/ATen/autocast_mode.h``,
      ``AT_FORALL_FP32`` and ``AT_FORALL_FP32_SET_OPT_DTYPE``): softmax, log_softmax, sum,
      cumsum, prod and the norms produce fp32 outputs, and exp, pow, rsqrt, log, layer_norm,
      rms_norm, group_norm and the losses cast their inputs to fp32 copies; under
      ``autocast("cpu")`` those stay in bf16. The policy is a ``TorchFunctionMode``: it
      sits above autograd, as the Autocast dispatch key does, so autograd saves the fp32
      copies a CUDA step saves (a mode below autograd would save the bf16 inputs);
    - the caching allocator's 512-byte blocks (``c10/cuda/CUDACachingAllocator.cpp``:
      ``kMinBlockSize``, ``round_size``): every storage is counted rounded up, as
      ``max_memory_allocated`` counts it;
    - cuBLAS workspaces, which are no tensors: one per (handle, stream)
      (``aten/src/ATen/cuda/CublasHandlePool.cpp``: ``getChosenWorkspaceSize``, 32 MiB on
      compute capability 9 and 10, ``:4096:2:16:8`` = 8 MiB + 128 KiB before; cuBLASLt
      shares it, ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``); handles are per thread and the
      autograd engine runs CUDA backward on its own device thread
      (``torch/csrc/autograd/engine.cpp``), so a training step holds two from its first
      backward on, inference one. Added analytically to every measured phase, labelled
      ``measured.analytic``.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from estimator.overheads import workspace_for
from estimator.setup import Setup
from profiler.measure.recompute import around_recomputation

#: CUDACachingAllocator's smallest block and rounding unit (kMinBlockSize)
CUDA_BLOCK_BYTES = 512
#: cuDNN attention's head-dim limit on sm90 in the cuDNN releases torch 2.11-2.13 ship
#: (sdp_utils.cpp: check_cudnn_tensor_shapes; 256 only with cuDNN > 9.22)
CUDNN_MAX_HEAD_DIM = 128
FLASH_MAX_HEAD_DIM = 256
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- both semantics
@contextlib.contextmanager
def never_packed() -> Iterator[None]:
    """During the block, transformers treats every batch as unpacked, as it does for a real
    (non-fake) batch of unpacked sequences, after making the same temporaries."""
    try:
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing to undo
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:  # a transformers without packed-sequence detection
        yield
        return

    def find_packed_sequence_indices(position_ids):
        mask = original(position_ids)
        if mask is not None:
            (mask[:, -1] == 0).all()  # the check a real batch runs before it returns None
        return None

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


# ---------------------------------------------------------------------- CUDA semantics
@dataclass(frozen=True)
class CudaTarget:
    """The GPU and libraries a sim run stands in for."""

    architecture: str = "hopper"
    cudnn_first: bool = True  # sdpa tries cuDNN first (runtime cuDNN > 9.15.0 on sm90/sm100)
    flash: bool = True  # flash and cuDNN attention run here (compute capability >= 8.0: kernels.has_flash)

    @property
    def workspace_bytes(self) -> int:
        return workspace_for(self.architecture)


def default_target(architecture: str = "hopper") -> CudaTarget:
    """An H100 (or another architecture) with the cuDNN of torch's PyPI wheels: > 9.15.0
    from torch 2.11 (cuDNN 9.19), so sdpa prefers cuDNN on hopper and blackwell."""
    major_minor = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return CudaTarget(architecture, cudnn_first=architecture in ("hopper", "blackwell") and major_minor >= (2, 11))


def target_for(setup: Setup) -> CudaTarget:
    """The GPU a setup names (``Setup.compute_capability``, which ``--gpu`` presets carry):
    Turing (7.5) has neither flash nor cuDNN attention on torch >= 2.2, so 16-bit sdpa runs
    the memory-efficient kernel or math (``sdp_utils.cpp`` ``check_flash_attention_hardware_support``;
    the estimator's ``kernels.has_flash``); Ampere and Ada (8.x) try flash first; Hopper and
    Blackwell cuDNN first (:func:`default_target`). Without one: an H100 (the default)."""
    from estimator.kernels import has_flash
    cc = setup.compute_capability
    if not cc:
        return default_target()
    major, minor = (int(x) for x in (cc.split(".") + ["0"])[:2])
    if major >= 10:
        return default_target("blackwell")
    if major == 9:
        return default_target("hopper")
    if major == 8:
        return CudaTarget("ada" if minor >= 9 else "ampere", cudnn_first=False)
    return CudaTarget("turing", cudnn_first=False, flash=has_flash(setup))


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, dropout_p: float,
                 is_causal: bool, enable_gqa: bool, target: CudaTarget) -> str:
    """The backend torch's CUDA dispatcher picks (sdp_utils.cpp: select_sdp_backend)."""
    d, half = q.shape[-1], q.dtype in _HALF
    heads_match = q.shape[-3] == k.shape[-3] == v.shape[-3]
    gqa_ok = heads_match or (enable_gqa and q.shape[-3] % k.shape[-3] == 0 and k.shape[-3] == v.shape[-3])
    same_d = d == k.shape[-1] == v.shape[-1]
    cudnn = (target.flash and half and gqa_ok and same_d and d % 8 == 0 and d <= CUDNN_MAX_HEAD_DIM and k.shape[-2] != 1
             and float(dropout_p * 16).is_integer()
             and (attn_mask is None or not attn_mask.requires_grad))
    flash = (target.flash and half and gqa_ok and same_d and d <= FLASH_MAX_HEAD_DIM and attn_mask is None
             and (not is_causal or q.shape[-2] == k.shape[-2]))
    efficient = heads_match and d % (8 if half else 4) == 0
    order = (("cudnn", cudnn), ("flash", flash)) if target.cudnn_first else (("flash", flash), ("cudnn", False))
    for name, ok in order + (("efficient", efficient),):
        if ok:
            return name
    return "math"


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _FlashAttention(torch.autograd.Function):
    """``_scaled_dot_product_flash_attention`` with its backward's own buffers: the meta
    backward allocates only dq, dk, dv (``_meta_registrations.py``), while ``mha_bwd``
    (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp) also allocates
    ``softmax_d`` (B, H, round_up(S_q, 128)) and ``dq_accum`` (B, round_up(S_q, 128), H,
    round_up(d, 32 if d <= 128 else 64)) in fp32, and for grouped-query heads full-head
    ``dk_expanded``/``dv_expanded`` (B, S_k, H, d) it sums into dk and dv."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, is_causal, scale):
        out, lse, _, _, max_q, max_k, rng, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, rng, unused)
        ctx.args = (dropout_p, is_causal, scale, max_q, max_k)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, rng, unused = ctx.saved_tensors
        dropout_p, is_causal, scale, max_q, max_k = ctx.args
        b, h, s_q, d = q.shape
        rounded = -(-s_q // 128) * 128
        unit = 32 if d <= 128 else 64
        work = [q.new_empty((b, h, rounded), dtype=torch.float32),
                q.new_empty((b, rounded, h, -(-d // unit) * unit), dtype=torch.float32)]
        if k.shape[1] != h:
            work += [k.new_empty((b, k.shape[2], h, d)), v.new_empty((b, v.shape[2], h, d))]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, None, None, max_q, max_k, dropout_p, is_causal, rng, unused, scale=scale)
        del work
        return dq, dk, dv, None, None, None


def _cuda_sdpa(target: CudaTarget):
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if torch.is_autocast_enabled("cpu"):
            # scaled_dot_product_attention is on both autocast lower-precision lists
            # (autocast_mode.h AT_FORALL_LOWER_PRECISION_FP; the CPU list in autocast_mode.cpp):
            # its fp32 inputs (after RoPE's fp32 tables) are cast before the kernel is chosen
            low = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(low) if t.is_floating_point() and t.dtype != low else t
                                 for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(low)
        backend = sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, target)
        if attn_mask is not None and attn_mask.dtype == torch.bool and backend in ("cudnn", "efficient"):
            # convert_boolean_attn_mask(_cudnn): an additive mask in the query's dtype
            attn_mask = torch.where(attn_mask, 0.0, -math.inf).to(query.dtype)
        if backend == "cudnn":
            lse = _wants_grad(query, key, value)  # should_compute_logsumexp
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                query, key, value, attn_mask, lse, dropout_p, is_causal, False, scale=scale)[0]
        if backend == "flash":
            return _FlashAttention.apply(query, key, value, dropout_p, is_causal, scale)
        if backend == "efficient":
            lse = _wants_grad(query, key, value)
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, lse, dropout_p, is_causal, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]
    return scaled_dot_product_attention


def _native_dropout(original):
    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() > 0:
            return torch.ops.aten.native_dropout(input, p, True)[0]  # (output, bool mask): autograd saves the mask
        return original(input, p, training, inplace)
    return dropout


def _named(*names: str) -> set:
    """The functions and Tensor methods of these names that exist in this torch."""
    out = set()
    for name in names:
        for owner in (torch, torch.Tensor, torch.nn.functional, torch.special, torch.linalg):
            fn = getattr(owner, name, None)
            if fn is not None:
                out.add(fn)
    return out


class CudaAutocastPolicy(TorchFunctionMode):
    """While CPU autocast is on, run the ops CUDA autocast runs in fp32 the way it runs them
    (aten/src/ATen/autocast_mode.h: AT_FORALL_FP32 casts each fp16/bf16 input to an fp32
    copy; AT_FORALL_FP32_SET_OPT_DTYPE passes dtype=float; both lists are empty of these
    ops on CPU). cross_entropy without label smoothing runs as CUDA runs it: log_softmax
    with an fp32 output and nll_loss, not CPU's fp32 copy of its input."""

    CAST = _named("exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "pow", "__pow__",
                  "__rpow__", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "layer_norm", "rms_norm",
                  "group_norm", "cosine_similarity", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
                  "huber_loss", "kl_div", "binary_cross_entropy_with_logits", "dist", "cdist", "pdist", "renorm",
                  "logsumexp")
    OUT_FP32 = _named("softmax", "log_softmax", "cumsum", "cumprod", "sum", "prod", "vector_norm", "matrix_norm")
    CROSS_ENTROPY = _named("cross_entropy")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func in self.CAST:
            args = tuple(_to_fp32(a) for a in args)
            kwargs = {k: _to_fp32(v) for k, v in kwargs.items()}
        elif func in self.OUT_FP32:
            first = args[0] if args else None
            if isinstance(first, torch.Tensor) and first.dtype in _HALF and kwargs.get("dtype") is None:
                kwargs = dict(kwargs, dtype=torch.float32)
        elif func in self.CROSS_ENTROPY and kwargs.get("label_smoothing", 0.0) == 0.0:
            return _cross_entropy_cuda(*args, **kwargs)
        return func(*args, **kwargs)


def _to_fp32(x):
    return x.to(torch.float32) if isinstance(x, torch.Tensor) and x.dtype in _HALF else x


def _cross_entropy_cuda(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                        reduction="mean", label_smoothing=0.0):
    f = torch.nn.functional
    log_probs = f.log_softmax(input, dim=1 if input.dim() > 1 else 0, dtype=torch.float32)
    return f.nll_loss(log_probs, target, weight=_to_fp32(weight), ignore_index=ignore_index, reduction=reduction)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


#: Where a trainer's own bookkeeping is written (site-packages-relative): a tensor it makes from
#: Python values alone (GRPO's end-of-sequence index and completion mask, trl 1.16.0
#: grpo_trainer.py:1881-1885) holds data, as the batch does
TRAINER_CODE = ("trl/trainer/", "transformers/trainer")


def _caller() -> str:
    """The first frame outside torch and this module that led to the op, as ``file:line``
    (site-packages-relative)."""
    import sys
    frame = sys._getframe(1)
    while frame is not None and ("/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno}"


class DataValues(TorchDispatchMode):
    """Values under the sim when a real trainer drives the step: the batches are real CPU
    tensors (the dataset's token ids), the model's tensors are fake. An op that reads only real
    tensors (the labels' mask, the item counts) runs for real, so what the data decides stays
    decided by the data: a boolean index by a real mask becomes its real positions, so the
    indexed copy has the real row count; so does a tensor a trainer's own code makes from Python
    values (``TRAINER_CODE``; the model's factory ops stay fake and counted). A Python scalar
    read from a fake tensor (a logged loss, a metric, a nan check; ``aten._local_scalar_dense``)
    has no value: it reads as 0, 0.0 or False; a selection by a fake mask (``nonzero``, a boolean
    index: a metric's nan filter) takes every element, the bound. :attr:`asked` counts each such
    call site (file:line)."""

    def __init__(self):
        super().__init__()
        self.asked: dict[str, int] = {}

    def _ask(self) -> None:
        where = _caller()
        self.asked[where] = self.asked.get(where, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException
        from torch.utils._python_dispatch import _disable_current_modes
        from torch.utils._pytree import tree_flatten
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and not any(_is_fake(t) for t in tensors) or not tensors and _caller().startswith(TRAINER_CODE):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype is torch.bool for i in args[1]):
            indices = []
            for i in args[1]:
                if not isinstance(i, torch.Tensor) or i.dtype is not torch.bool:
                    indices.append(i)
                elif not _is_fake(i):
                    with _disable_current_modes():
                        indices.extend(i.nonzero(as_tuple=True))
                else:  # a fake mask (a metric's nan filter): every element selected, the bound
                    self._ask()
                    indices.extend(torch.zeros(i.numel(), dtype=torch.long) for _ in range(i.dim()))
            return func(args[0], indices)
        if func is torch.ops.aten.nonzero.default and _is_fake(args[0]):
            self._ask()  # every element nonzero, the bound
            return torch.zeros((args[0].numel(), args[0].dim()), dtype=torch.long)
        if func is torch.ops.aten._local_scalar_dense.default:
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:
                pass
            self._ask()
            dtype = args[0].dtype
            return False if dtype is torch.bool else 0.0 if dtype.is_floating_point else 0
        return func(*args, **kwargs)


@contextlib.contextmanager
def _modules_move_in_place() -> Iterator[None]:
    """``Module.to`` on fake tensors as on real ones: each parameter converted keeps its identity
    (``param.data = param.to(...)``, which torch does for real tensors), buffers are replaced, and a
    tensor already there is left alone. torch swaps a fake parameter instead (torch/nn/modules/
    module.py ``_apply``: ``isinstance(param, FakeTensor)``), and the swap fails on the tracker's
    weak references: the Trainer's and accelerate's placement of a model already on its (fake)
    device (transformers trainer.py ``_move_model_to_device``, accelerate accelerator.py
    ``prepare_model``), peft's move of a new adapter to its base layer's dtype (peft 0.21
    tuners_utils.py ``_move_adapter_to_device_of_base_layer``). Only ``to``'s dtype and device
    (dtype for floating-point tensors, as ``Module.to`` converts)."""
    from unittest import mock

    def to(module, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)

        def convert(t):
            return t.to(device, dtype if dtype is not None and t.is_floating_point() else None, non_blocking)

        for sub in module.modules():
            for param in sub._parameters.values():
                if param is not None and (new := convert(param)) is not param:
                    param.data = new
            for name, buf in sub._buffers.items():
                if buf is not None:
                    sub._buffers[name] = convert(buf)
        return module

    with mock.patch.object(torch.nn.Module, "to", to):
        yield


@contextlib.contextmanager
def _generation_runs_to_its_length() -> Iterator[None]:
    """``generate`` under the sim stops at its length, never at an end-of-sequence token: a sampled
    token is fake, so whether a row finished cannot be read (transformers 5.24 generation/utils.py
    ``StopCheck``, :393-396, reads ``unfinished_sequences.max() == 0``, which :class:`DataValues`
    answers False). Every completion runs to ``max_new_tokens``, the length the estimate takes (the
    worst case); the length test is the stopping criteria's own (``StoppingCriteriaList.max_length``,
    stopping_criteria.py:626-630, against the ids so far), read where ``_sample``'s loop asks
    ``_has_unfinished_sequences`` (:3020-3036, :3230). What ``generate`` returns, fake ids whose
    values a trainer goes on to read (GRPO masks after <eos> and decodes the text, trl 1.16.0
    grpo_trainer.py:1877-1888), is given back as real ids of its shape, every one the vocabulary's
    last id (no <eos>: GRPO's harness puts it past the vocabulary, grpo_steps.py; the prompt's
    values matter to no allocation and a trainer keeps its own prompt ids); the fake ids are freed.
    (Real ids are not tracked: b x (prompt + completion) int64, a few KiB.)"""
    from unittest import mock

    from torch.utils._python_dispatch import _disable_current_modes
    from transformers.generation import stopping_criteria, utils
    done = [False]
    criteria = stopping_criteria.StoppingCriteriaList.__call__
    unfinished, generate = utils.GenerationMixin._has_unfinished_sequences, utils.GenerationMixin.generate

    def generate_real_ids(self, *args, **kwargs):
        out = generate(self, *args, **kwargs)
        if not isinstance(out, torch.Tensor) or not _is_fake(out):
            return out
        with _disable_current_modes():  # real ids of the generated shape: the vocabulary's last id
            return torch.full(out.shape, self.config.get_text_config().vocab_size - 1, dtype=out.dtype)

    def call(self, input_ids, scores, **kwargs):
        limit = self.max_length
        done[0] = limit is not None and input_ids.shape[-1] >= limit
        return criteria(self, input_ids, scores, **kwargs)

    def has_unfinished(self, this_peer_finished, synced_gpus, device):
        if done[0]:
            done[0] = False  # the next generate starts afresh
            return False
        return unfinished(self, False, synced_gpus, device)

    with mock.patch.object(stopping_criteria.StoppingCriteriaList, "__call__", call), \
            mock.patch.object(utils.GenerationMixin, "_has_unfinished_sequences", has_unfinished), \
            mock.patch.object(utils.GenerationMixin, "generate", generate_real_ids):
        yield


@contextlib.contextmanager
def driven_on_the_sim(sim: bool) -> Iterator[DataValues | None]:
    """Around a real trainer's construction and ``train()`` on the sim (``sim`` false: nothing):
    :class:`DataValues`, modules moved in place (:func:`_modules_move_in_place`) and generation
    to its length (:func:`_generation_runs_to_its_length`)."""
    if not sim:
        yield None
        return
    values = DataValues()
    with _modules_move_in_place(), _generation_runs_to_its_length(), values:
        yield values


class _RealBatches:
    """A trainer's data loader whose iterator and batches are made outside the sim's modes: real
    CPU tensors of the dataset's values (the loader's seed and the collator's tensors would
    otherwise be fake and their values unreadable); the rest of the loader as it is."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            batches = iter(self._loader)
        while True:
            with _disable_current_modes():
                try:
                    batch = next(batches)
                except StopIteration:
                    return
            yield batch


def real_batches(trainer) -> None:
    """Make ``trainer`` (a transformers Trainer) read real batches under the sim (:class:`_RealBatches`)."""
    make = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: _RealBatches(make())


class _TritonLaunch:
    """A Triton kernel as the sim launches it: ``kernel[grid](*args)`` writes into the buffers it is
    given and allocates nothing (fake tensors have no values to write)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def trl_fused_head_on_cuda() -> Iterator[None]:
    """TRL's fused LM head (trl 1.16.0 kernels/chunked_logprob.py) as it runs on a CUDA device, on
    fake CPU tensors: ``_use_triton`` (:48-49) true, so the fold is the Triton kernel
    (``_forward_kernel`` / ``_backward_kernel``, :79 and :151: in-place into the tile and the
    per-row statistics, no allocation) instead of the torch fold (``_forward_tile``, :211, whose
    fp32 temporaries the cpu device pays), and trainer/utils.py:1642's compact path scores the
    labelled rows only; ``_addmm_fp32`` (:52-63) takes CUDA's ``addmm(out_dtype=float32)`` into the
    fp32 accumulator instead of fp32 copies of both operands. Without trl installed, nothing."""
    try:
        from trl.kernels import chunked_logprob as kernels
        from trl.trainer import utils as trl_utils
    except ImportError:
        yield
        return
    from types import SimpleNamespace
    from unittest import mock

    def addmm_fp32(acc, a, b):
        if kernels._MM_OUT_DTYPE and a.dtype in _HALF:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(a.float(), b.float())

    with mock.patch.multiple(kernels, _use_triton=lambda device: True, _forward_kernel=_TritonLaunch(),
                             _backward_kernel=_TritonLaunch(), _addmm_fp32=addmm_fp32), \
            mock.patch.object(kernels, "triton", SimpleNamespace(cdiv=lambda a, b: -(-a // b)), create=True), \
            mock.patch.object(trl_utils, "_use_triton", lambda device: True):
        yield


@contextlib.contextmanager
def cuda_semantics(setup: Setup, target: CudaTarget | None = None) -> Iterator[None]:
    """Emulate what a CUDA step allocates, on fake CPU tensors; see the module docstring.
    (The 512-byte rounding is the tracker's ``round_bytes``, set before anything is tracked.)"""
    target = target or target_for(setup)
    f = torch.nn.functional
    originals = (f.scaled_dot_product_attention, f.dropout)
    f.scaled_dot_product_attention = _cuda_sdpa(target)
    f.dropout = _native_dropout(originals[1])
    try:
        with contextlib.ExitStack() as stack:
            if setup.trainer.value != "hf":
                stack.enter_context(trl_fused_head_on_cuda())
            if setup.precision.is_autocast:
                stack.enter_context(CudaAutocastPolicy())
                inner: list = []  # and again inside each checkpointed recomputation
                stack.enter_context(around_recomputation(
                    lambda: inner.append(CudaAutocastPolicy().__enter__()),
                    lambda: inner.pop().__exit__(None, None, None)))
            yield
    finally:
        f.scaled_dot_product_attention, f.dropout = originals


def analytic_bytes(setup: Setup, target: CudaTarget | None = None) -> dict[str, int]:
    """Non-tensor memory a CUDA step holds in ``max_memory_allocated`` at every measured
    phase (after the warm-up step): the cuBLAS workspaces of the forward's thread and,
    when training, of autograd's device thread (the default target's size, as the estimate
    takes without ``--gpu``: ``Setup.compute_capability`` chooses kernels, not this)."""
    target = target or default_target()
    return {"cublas_workspaces": (2 if setup.training else 1) * target.workspace_bytes}
