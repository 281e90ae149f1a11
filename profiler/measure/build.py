"""Build a real Hugging Face model from a ModelSpec's config and apply a Setup to it
exactly as a user would: dtype cast or autocast, peft LoRA, QLoRA, gradient
checkpointing, the attention implementation, the optimizer and its implementation.
Random initialisation, never a download; ``trust_remote_code`` stays off."""
from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from estimator.configcheck import strip_code_keys
from estimator.modelspec import ModelSpec
from estimator.setup import Attention, Mode, Optimizer, OptimizerImpl, Precision, Quant, Setup, Trainer
from profiler.measure.compat import dtype_kwargs

ATTN_IMPL = {Attention.EAGER: "eager", Attention.SDPA: "sdpa", Attention.FLASH: "flash_attention_2"}


class SetupUnavailable(ValueError):
    """A setup this machine cannot run (a missing optional package, no CUDA)."""


#: The optional extras a run can need (pyproject.toml [project.optional-dependencies]): the
#: modules each one's run imports, and the extra that installs them
_TRL_MODULES, _QUANT_MODULES = ("trl", "datasets"), ("bitsandbytes",)
_BNB_OPTIMIZERS = (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT)


def missing_extra(setup: Setup) -> str | None:
    """One sentence naming the optional package a setup's run needs that is not installed and
    the extra that installs it, or None. A sweep skips such a case without a record (it runs when
    the extra is installed and the sweep resumes); run by hand, the harness says the same as
    SetupUnavailable. Checked by module spec, nothing imported."""
    needs = []
    if setup.trainer is not Trainer.HF:
        needs.append((_TRL_MODULES, "trl", f"--trainer {setup.trainer}"))
    if setup.quant is not Quant.NONE or setup.optimizer in _BNB_OPTIMIZERS:
        what = f"--quant {setup.quant}" if setup.quant is not Quant.NONE else f"--optimizer {setup.optimizer}"
        needs.append((_QUANT_MODULES, "quant", what))
    for modules, extra, what in needs:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            return (f"{what} needs {' and '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not "
                    f"installed (pip install -e '.[{extra}]')")
    return None


def hf_config(spec: ModelSpec):
    """The transformers config of a spec, without the keys that load code or kernels
    (configcheck.CODE_LOADING_KEYS: the attention implementation comes from the setup)."""
    import transformers
    config, _ = strip_code_keys(spec.config)
    # a checkpoint's own quantization (gpt-oss's {"quant_method": "mxfp4"}) is not the setup's:
    # vramlab builds random-init weights in the setup's precision and quantizes only by --quant,
    # and from_pretrained would take the config's method (mxfp4 fetches hub kernels:
    # transformers integrations/mxfp4.py)
    config.pop("quantization_config", None)
    try:
        return transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"transformers cannot read {spec.name}'s config: {exc}") from None


def build_model(spec: ModelSpec, setup: Setup, device: str, route: str = "load") -> torch.nn.Module:
    """The model on ``device`` (``"cuda"``, ``"cpu"``; ``"meta"`` for the sim, which makes
    fake tensors of it). A quantized setup goes through bitsandbytes as transformers 5 loads
    it (profiler/measure/quant.py): ``route`` ``"load"`` (save and ``from_pretrained``, what a
    user runs) or ``"swap"`` (the same replacement and quantization on the built model; meta
    always swaps)."""
    import transformers
    cfg = hf_config(spec)
    dtype = getattr(torch, setup.precision.torch_dtype_name)
    if setup.quant is not Quant.NONE:
        return _build_quantized(cfg, setup, device, route)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=ATTN_IMPL[setup.attn], trust_remote_code=False, **dtype_kwargs(dtype))
    if setup.training:
        model.train()
        model.config.use_cache = False  # as fine-tuning scripts do; no KV cache while training
        if setup.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
    if setup.mode is Mode.LORA:
        model = apply_lora(model, setup)
    return model


ROUTES = ("load", "swap")


def _build_quantized(cfg, setup: Setup, device: str, route: str):
    """A bitsandbytes model (profiler/measure/quant.py), its unquantized modules in the recipe's
    parameter dtype (bf16 for bf16, fp32 for the fp32-loaded amp recipes), then for QLoRA the
    k-bit preparation (``Setup.kbit_prep``) and the adapters."""
    import transformers

    from profiler.measure import quant
    if route not in ROUTES:
        raise ValueError(f"unknown quantized build route {route!r}; choose one of: {', '.join(ROUTES)}")
    try:
        quant.require_bitsandbytes(f"quantization {setup.quant}")
        attn = ATTN_IMPL[setup.attn]
        dtype = getattr(torch, setup.precision.torch_dtype_name)
        if route == "load" and device != "meta":
            model = quant.load_quantized(cfg, setup, device, attn, dtype)
        else:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(
                    cfg, attn_implementation=attn, trust_remote_code=False, **dtype_kwargs(dtype))
            model = quant.swap_quantized(model, setup, device)
    except quant.QuantUnavailable as exc:
        raise SetupUnavailable(str(exc)) from None
    if not setup.training:
        return model.eval()
    model.train()
    model.config.use_cache = False
    model = quant.prepare_for_kbit_training(model, setup)
    return apply_lora(model, setup)


def materialize_fake(model: torch.nn.Module, fake_mode) -> torch.nn.Module:
    """Replace a meta-device model's parameters and buffers with fake CPU tensors of the same
    shape and dtype (tied parameters stay tied). Building on meta first lets peft attach
    adapters without moving fake parameters (``Module._apply`` cannot swap FakeTensors)."""
    memo: dict = {}
    if any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules()):
        from profiler.measure.quant import materialize_quant_state
        materialize_quant_state(model, fake_mode, memo)
    with fake_mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                     requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    if id(b) not in memo:
                        memo[id(b)] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
                    module._buffers[name] = memo[id(b)]
    return model


def apply_lora(model, setup: Setup):
    from peft import LoraConfig, get_peft_model
    targets: Any = list(setup.lora_targets)
    if targets in (["all-linear"], ["all_linear"]):
        targets = "all-linear"
    if setup.grad_ckpt:
        model.enable_input_require_grads()  # peft's recipe: checkpointed blocks need a grad input
    config = LoraConfig(r=setup.lora_rank, lora_alpha=setup.alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class MixedPrecisionOptimizer:
    """mixed-bf16: bf16 weights and grads on the model, fp32 master weights and fp32
    optimizer state (ZeRO's recipe, Rajbhandari et al. 2019 Sec. 3; DeepSpeed bf16 optimizer)."""

    def __init__(self, params: list[torch.nn.Parameter], make: Callable[[list[torch.Tensor]], Any]):
        self.params = params
        self.masters = [p.detach().float().requires_grad_(True) for p in params]
        self.inner = make(self.masters)
        self.on_master_grads: Callable[[list[torch.Tensor]], None] | None = None  # the harness tags them

    def step(self) -> None:
        for m, p in zip(self.masters, self.params):
            m.grad = None if p.grad is None else p.grad.float()
        if self.on_master_grads is not None:  # fp32 copies of the gradients: gradients, as the estimate names them
            self.on_master_grads([m.grad for m in self.masters if m.grad is not None])
        self.inner.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.params):
                p.copy_(m)
                m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def build_optimizer(model: torch.nn.Module, setup: Setup):
    """The setup's optimizer over the trainable parameters; None for ``--optimizer none``."""
    if setup.optimizer is Optimizer.NONE:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    # Say which implementation, always: torch's default (torch/optim/optimizer.py:
    # _default_to_fused_or_foreach) picks the for-loop for fake tensors even where a CUDA
    # step would run foreach, since FakeTensor is not in _foreach_supported_types.
    impl = setup.resolved_optimizer_impl
    kw = {}
    if impl is OptimizerImpl.FOREACH:
        kw = {"foreach": True}
    elif impl is OptimizerImpl.FUSED:
        kw = {"fused": True}
    elif impl is OptimizerImpl.FORLOOP:
        kw = {"foreach": False}

    def make(ps):
        opt = setup.optimizer
        if opt is Optimizer.ADAMW:
            return torch.optim.AdamW(ps, lr=1e-5, **kw)
        if opt is Optimizer.SGD:
            return torch.optim.SGD(ps, lr=1e-3, **kw)
        if opt is Optimizer.SGD_MOMENTUM:
            return torch.optim.SGD(ps, lr=1e-3, momentum=0.9, **kw)
        if opt is Optimizer.ADAFACTOR:
            return torch.optim.Adafactor(ps, lr=1e-3, **{k: v for k, v in kw.items() if k == "foreach"})
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SetupUnavailable(f"{opt} needs bitsandbytes, which is not installed (pip install "
                                   f"'vramlab[quant]'); the other optimizers still run") from None
        # bitsandbytes 0.50.2 optim/adamw.py: AdamW8bit and PagedAdamW8bit (optim_bits=8,
        # min_8bit_size=4096, is_paged); paging is off on CPU (optim/optimizer.py:375-382)
        make_bnb = bnb.optim.PagedAdamW8bit if opt is Optimizer.PAGED_ADAMW_8BIT else bnb.optim.AdamW8bit
        # its __init__ builds the quantization maps from Python lists (functional.py:327
        # create_dynamic_map: ``.tolist()``), which a FakeTensorMode cannot answer: under the sim
        # they are built as real tensors (256 values each, seen by the tracker as on a cpu step)
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():
            return make_bnb(ps, lr=1e-5)

    if setup.precision is Precision.MIXED_BF16 and setup.mode is Mode.FULL:
        return MixedPrecisionOptimizer(params, make)
    return make(params)


def autocast_context(setup: Setup, device: str):
    if setup.precision.is_autocast:
        return torch.autocast(device_type=device, dtype=getattr(torch, setup.precision.compute_dtype_name))
    return contextlib.nullcontext()


def synthetic_batch(spec: ModelSpec, setup: Setup, device: str, generator: torch.Generator | None = None):
    """Token ids of shape (batch, seq); labels are the same ids (causal LM loss)."""
    return torch.randint(0, spec.vocab_size, (setup.batch, setup.seq), device=device, generator=generator)
