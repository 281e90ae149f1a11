"""bitsandbytes models as transformers 5 builds them: the weight quantization of ``--mode
qlora`` and quantized inference, and the preparation for k-bit training.

transformers 5 quantizes only while loading weights (``from_config`` takes no
``quantization_config``): its bnb quantizer replaces the linears on the meta device
(5.24 integrations/bitsandbytes.py:162-236 ``replace_with_bnb_linear``, skipping
``quantizers/base.py:39 get_keys_to_not_convert``: tied weights, the last module, the
output embedding) and quantizes each loaded weight as ``Params4bit(value,
requires_grad=False, **old_value.__dict__).to(value.device)`` (integrations/bitsandbytes.py
``Bnb4bitQuantize.convert``; ``Int8Params`` for 8 bit, ``Bnb8bitQuantize``). Two routes do
the same here, random initialisation throughout:

- ``load``: the random-init model saved to a temporary directory and loaded back with
  ``from_pretrained(..., quantization_config=..., device_map=device)``, what a user runs;
- ``swap``: the built model's linears replaced and quantized with the same two calls, on
  any device, meta included (the sim quantizes on meta, then makes fake tensors of the
  packed weights and their quantization state, :func:`materialize_quant_state`).

Nothing here imports bitsandbytes unless a quantized setup is built; without it the build
says so in one sentence (``SetupUnavailable``) and every other setup still runs.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

import torch

from estimator.setup import KbitPrep, Quant, Setup

#: What bitsandbytes' QuantState holds as tensors (bitsandbytes 0.50.2 functional.py
#: ``QuantState.__init__``: absmax, code, offset; the nested state2 its own absmax and code)
QUANT_STATE_TENSORS = ("absmax", "code", "offset")


class QuantUnavailable(ValueError):
    """bitsandbytes is not installed (the build turns it into SetupUnavailable)."""


def require_bitsandbytes(what: str):
    try:
        import bitsandbytes
    except ImportError:
        raise QuantUnavailable(f"{what} needs bitsandbytes, which is not installed (pip install "
                               f"'vramlab[quant]'); every other setup still runs") from None
    return bitsandbytes


def bnb_config(setup: Setup):
    """The ``BitsAndBytesConfig`` of a setup: 8-bit LLM.int8, or 4-bit NF4 / FP4 with the
    compute dtype of the precision recipe. The packed 4-bit weights are stored in
    ``bnb_4bit_quant_storage``: uint8 (bitsandbytes' default) on one device, the compute dtype
    under FSDP and ZeRO-3, which flatten only floating-point parameters (bitsandbytes PR #970;
    the bytes are the same either way: two 4-bit values per uint8, four per bf16)."""
    import transformers
    compute = getattr(torch, setup.precision.compute_dtype_name)
    if setup.quant is Quant.INT8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    storage = compute if setup.shards_params else torch.uint8
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4" if setup.quant is Quant.FP4 else "nf4",
        bnb_4bit_use_double_quant=setup.quant is Quant.NF4_DQ, bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-weight progress bars off while a temporary checkpoint is written and read."""
    from transformers.utils import logging as hf_logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_quantized(cfg, setup: Setup, device: str, attn: str, dtype):
    """Route ``load``: save the random-init model (compute dtype) and ``from_pretrained`` it
    with the quantization config and ``device_map`` (transformers 5.24 modeling_utils.py
    ``from_pretrained``: the quantizer's ``_process_model_before_weight_loading`` replaces
    the linears, each weight is quantized as it loads)."""
    import transformers

    from profiler.measure.compat import dtype_kwargs
    require_bitsandbytes(f"quantization {setup.quant}")
    with tempfile.TemporaryDirectory(prefix="vramlab-bnb-") as tmp, _quiet_loading():
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, **dtype_kwargs(dtype))
        # every rank writes its own temporary checkpoint: under an initialized process group
        # transformers 5.24 writes on rank 0 only (distributed/mixin.py:345-350
        # ``should_save_on_this_rank``; modeling_utils.py:3417), which left the other ranks'
        # folders empty ("Unrecognized model ... model_type") and QLoRA under FSDP unrunnable
        model.should_save_on_this_rank = lambda is_main_process: True
        model.save_pretrained(tmp)
        del model
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config(setup), device_map=device, attn_implementation=attn,
            **dtype_kwargs(dtype))


def swap_quantized(model, setup: Setup, device: str):
    """Route ``swap``: the built model's linears replaced and quantized as transformers' bnb
    quantizer does it, with its own functions (``get_keys_to_not_convert``,
    ``replace_with_bnb_linear``), then each weight quantized as ``Bnb4bitQuantize`` /
    ``Bnb8bitQuantize`` do; on meta the 4-bit quantization runs on meta tensors
    (bitsandbytes' fake kernels give the packed shapes and the quantization state),
    ``Params4bit.to`` itself skips meta (bitsandbytes nn/modules.py ``to``)."""
    bnb = require_bitsandbytes(f"quantization {setup.quant}")
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    qc = bnb_config(setup)
    skip = list(dict.fromkeys(get_keys_to_not_convert(model) + list(qc.llm_int8_skip_modules or [])))
    originals = {name: (module.weight, module.bias) for name, module in model.named_modules()
                 if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear)
                 and should_convert_module(name, skip)}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    meta = torch.device(device).type == "meta"
    for name, module in model.named_modules():
        if name not in originals:
            continue
        weight, bias = originals[name]
        value = weight.data.T if issubclass(module.source_cls, Conv1D) else weight.data
        if isinstance(module, bnb.nn.Linear4bit):
            new = bnb.nn.Params4bit(value, requires_grad=False, **module.weight.__dict__)
            new = new._quantize(torch.device("meta")) if meta else new.to(device)
        else:
            kwargs = dict(module.weight.__dict__)
            kwargs.pop("SCB", None)
            if meta:
                raise ValueError("int8 weights cannot be simulated: bitsandbytes quantizes Int8Params "
                                 "on the device only; measure int8 on --backend cpu or cuda")
            new = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)
        module.weight = new
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.data, requires_grad=False)
    setattr(model, "is_loaded_in_8bit" if setup.quant is Quant.INT8 else "is_loaded_in_4bit", True)
    model.config.quantization_config = qc
    return model


def prepare_for_kbit_training(model, setup: Setup):
    """The setup's preparation path (``Setup.kbit_prep``): peft's
    ``prepare_model_for_kbit_training`` (peft 0.21 utils/other.py:158-259: every parameter
    frozen, every fp16/bf16 parameter but ``Params4bit`` cast to fp32, gradient checkpointing
    with input gradients when asked) or nothing. Checkpointing is non-reentrant either way,
    as the rest of the harness runs it."""
    if setup.resolved_kbit_prep is KbitPrep.PEFT:
        from peft import prepare_model_for_kbit_training
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_ckpt,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    if setup.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def quant_state_tensors(model) -> list[torch.Tensor]:
    """The tensors of every quantized layer's state that are no parameter or buffer:
    bitsandbytes' ``Params4bit.quant_state`` (absmax, code, offset and the nested state's
    absmax and code) and ``Int8Params.SCB`` (bitsandbytes nn/modules.py)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # the weight's state, or the module's copy of it: ``Params4bit`` hands its state to its
        # module (bitsandbytes nn/modules.py:376-377, 392-393), and once FSDP2's ``fully_shard``
        # has swapped the weight for a DTensor shard only the module's reference is left
        # (``fix_4bit_weight_quant_state_from_module``, :487-501, restores it in forward)
        state = getattr(weight, "quant_state", None) if weight is not None else None
        state = state if state is not None else getattr(module, "quant_state", None)
        for qs in (state, getattr(state, "state2", None)):
            for name in QUANT_STATE_TENSORS:
                t = getattr(qs, name, None) if qs is not None else None
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        scb = getattr(weight, "SCB", None) if weight is not None else None
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out


def materialize_quant_state(model, fake_mode, memo: dict) -> None:
    """The sim's fake tensors for a meta-quantized model: each packed 4-bit weight becomes a
    fake parameter of the same shape and storage dtype carrying ``Params4bit``'s attributes
    (``Linear4bit.forward`` reads ``weight.quant_state``), each state tensor a fake one."""
    def fake_like(t):
        if id(t) not in memo:
            with fake_mode:
                memo[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        return memo[id(t)]

    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        for qs in (state, getattr(state, "state2", None)):
            for name in QUANT_STATE_TENSORS:
                t = getattr(qs, name, None) if qs is not None else None
                if isinstance(t, torch.Tensor):
                    setattr(qs, name, fake_like(t))
        with fake_mode:
            new = torch.nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device="cpu"), requires_grad=False)
        new.__dict__.update({k: v for k, v in weight.__dict__.items() if k != "data"})
        memo[id(weight)] = memo[id(new)] = new
        module._parameters["weight"] = new
        if hasattr(module, "quant_state"):
            module.quant_state = state


#: bitsandbytes' custom ops whose kernels allocate beyond their outputs. A TorchDispatchMode
#: sees a custom op as one call (torch pops the mode while the op's kernel runs), so the
#: tracker would see only what the op returns; these kernels are Python functions of torch
#: ops, and run as such while a step is measured, each op they call seen. (op, device
#: semantics) -> where the kernel is (bitsandbytes 0.50.2).
VISIBLE_KERNELS = {
    # the CPU's gemm_4bit is the default kernel (backends/default/ops.py:323-345): the nested
    # absmax dequantized (fp32, then + offset, fp32), the weight dequantized to the input's
    # dtype, F.linear; CUDA runs the same three allocations (backends/cuda/ops.py:904-916
    # ``_dequant_linear_fallback``) for more than 1536 rows (``_gemm_4bit_custom_max_m``,
    # :922) and its fused kernel below (only the output; :846-901)
    ("gemm_4bit", "cpu"): ("bitsandbytes.backends.default.ops", "_gemm_4bit_default_impl"),
    ("gemm_4bit", "cuda"): ("bitsandbytes.backends.default.ops", "_gemm_4bit_default_impl"),
    # CPU's 8-bit and 32-bit optimizer updates dequantize both states to fp32 and step them
    # with tensor ops (backends/cpu/ops.py:345-451, 469-580); CUDA's are fused kernels
    ("optimizer_update_8bit_blockwise", "cpu"): ("bitsandbytes.backends.cpu.ops",
                                                 "_optimizer_update_8bit_blockwise_cpu"),
    ("optimizer_update_32bit", "cpu"): ("bitsandbytes.backends.cpu.ops", "_optimizer_update_32bit_cpu"),
}
#: CUDA's gemm_4bit dequantizes the weight above this many rows (backends/cuda/ops.py:922);
#: from 5 to 1536 rows a per-architecture heuristic picks the fused kernel or the fallback
#: (:584-838): the sim assumes the fallback there too, at most one dequantized weight more
CUDA_FUSED_MAX_ROWS = 4


def uses_bitsandbytes(setup: Setup) -> bool:
    """Whether a setup runs bitsandbytes: quantized weights or an 8-bit optimizer."""
    return setup.quant is not Quant.NONE or (setup.training and setup.optimizer.bitsandbytes)


@contextlib.contextmanager
def visible_kernels(setup: Setup, device: str) -> Iterator[None]:
    """While measuring a step with ``device``'s semantics (``"cpu"`` or ``"cuda"``), run the
    bitsandbytes kernels of :data:`VISIBLE_KERNELS` as the Python functions they are, so the
    tracker sees what they allocate; nothing for a setup that runs no bitsandbytes (which is
    then not imported). Restored on exit."""
    import importlib
    if not uses_bitsandbytes(setup):
        yield
        return
    require_bitsandbytes(f"{setup.quant if setup.quant is not Quant.NONE else setup.optimizer}")
    namespace = torch.ops.bitsandbytes
    patched = []
    for (op, dev), (module, name) in VISIBLE_KERNELS.items():
        if dev != device:
            continue
        packet = getattr(namespace, op)
        impl = getattr(importlib.import_module(module), name)
        if op == "gemm_4bit" and device == "cuda":
            impl = _cuda_gemm_4bit(packet.default, impl)
        # the op's name in bitsandbytes' namespace answers with the kernel itself, called as
        # ``torch.ops.bitsandbytes.op(...)`` or ``.default(...)``: no dispatch, so the tracker
        # sees the ops the kernel runs (the dispatcher's own entry for the op is untouched)
        setattr(namespace, op, _Direct(impl))
        patched.append((op, packet))
    try:
        yield
    finally:
        for op, packet in patched:
            setattr(namespace, op, packet)


class _Direct:
    """An op name that calls a Python kernel directly (``op(...)`` and ``op.default(...)``)."""

    def __init__(self, kernel):
        self.default = kernel

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)


def _cuda_gemm_4bit(fused, fallback):
    def gemm_4bit(A, B, shapeB, *args, **kwargs):
        rows = A.numel() // A.shape[-1]
        return (fused if rows <= CUDA_FUSED_MAX_ROWS else fallback)(A, B, shapeB, *args, **kwargs)
    return gemm_4bit
