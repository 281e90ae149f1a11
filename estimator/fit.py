"""fit(): what fits in a memory budget — the largest batch, the longest sequence, and
the strategies that bring a setup under the budget, cheapest first."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .cli_args import check_flags
from .estimate import Estimate, estimate
from .gpus import GPU
from .modelspec import ModelSpec
from .overheads import DEFAULT, Overheads
from .params import default_lora_targets
from .setup import Mode, Optimizer, Precision, Quant, Setup, Sharding
from .sharding import smallest_world
from .units import GiB

MAX_SEARCH = 1 << 20  # upper bound for batch and sequence searches


@dataclass(frozen=True)
class Strategy:
    name: str
    setup: Setup
    total_bytes: int
    fits: bool
    max_batch: int


@dataclass(frozen=True)
class FitResult:
    model: str
    memory_bytes: int
    setup: Setup
    estimate: Estimate
    fits: bool
    max_batch: int  # at the setup's seq; 0 when even batch 1 does not fit
    max_seq: int  # at the setup's batch; 0 when even 1 token does not fit
    strategies: list[Strategy] = field(default_factory=list)
    min_gpus: int | None = None  # ZeRO-3 ranks needed for the setup as given
    #: the setup as given under each precision recipe (named by it), the given one included:
    #: "batch 9 fits" in pure bf16 says nothing of a Trainer's amp-bf16 run
    recipes: list[Strategy] = field(default_factory=list)

    def verdict(self) -> str:
        """One sentence about the setup as given: it fits, or it does not and what would
        (never both: ``min_gpus`` is searched only when the setup does not fit)."""
        total, budget = self.estimate.total_bytes / GiB, self.memory_bytes / GiB
        recipe = f"(precision {self.setup.precision})"
        if self.fits:
            return f"The setup as given fits {recipe}: {total:.2f} of {budget:.2f} GiB."
        one_gpu = any(s.fits for s in self.strategies if s.setup.world_size == 1)
        text = f"The setup as given does not fit {recipe}: it needs {total:.2f} GiB of {budget:.2f}; " + \
            ("a one-GPU strategy above does" if one_gpu else "no one-GPU strategy above does")
        if self.min_gpus:
            text += f"; ZeRO-3 needs {self.min_gpus} GPUs of this size"
        return text + "."

    def to_dict(self) -> dict:
        return {
            "model": self.model, "memory_bytes": self.memory_bytes, "fits": self.fits,
            "total_bytes": self.estimate.total_bytes, "max_batch": self.max_batch, "max_seq": self.max_seq,
            "min_gpus_zero3": self.min_gpus, "setup": self.setup.to_dict(),
            "strategies": [{"name": s.name, "total_bytes": s.total_bytes, "fits": s.fits,
                            "max_batch": s.max_batch, "setup": s.setup.to_dict()} for s in self.strategies],
            "recipes": [{"precision": s.name, "total_bytes": s.total_bytes, "fits": s.fits,
                         "max_batch": s.max_batch} for s in self.recipes],
        }


def _largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest n in [1, hi] with fits(n), fits monotone decreasing; 0 if none."""
    if not fits(1):
        return 0
    lo = 1
    step = 1
    while lo + step <= hi and fits(lo + step):  # gallop, then bisect
        lo += step
        step *= 2
    top = min(lo + step, hi + 1)
    while top - lo > 1:
        mid = (lo + top) // 2
        if fits(mid):
            lo = mid
        else:
            top = mid
    return lo


def _total(spec, setup, gpu, overheads) -> int:
    return estimate(spec, setup, gpu, overheads).total_bytes


def fit(spec: ModelSpec, setup: Setup, memory_bytes: int, gpu: GPU | None = None,
        overheads: Overheads = DEFAULT) -> FitResult:
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    est = estimate(spec, setup, gpu, overheads)
    under = lambda s: _total(spec, s, gpu, overheads) <= memory_bytes  # noqa: E731
    max_pos = spec.max_positions - setup.new_tokens if spec.max_positions else MAX_SEARCH
    max_batch = _largest(lambda b: under(setup.replace(batch=b)), MAX_SEARCH)
    max_seq = _largest(lambda s: under(setup.replace(seq=s)), max(max_pos, 1))
    strategies = []
    for name, candidate in _ladder(setup, default_lora_targets(spec)):
        total = _total(spec, candidate, gpu, overheads)
        strategies.append(Strategy(name, candidate, total, total <= memory_bytes,
                                   _largest(lambda b, c=candidate: under(c.replace(batch=b)), MAX_SEARCH)))
    fits = est.total_bytes <= memory_bytes
    min_gpus = None
    if setup.training and setup.sharding is Sharding.NONE and not fits:
        n = smallest_world(spec, setup, memory_bytes, lambda sp, su: estimate(sp, su, gpu, overheads),
                           Sharding.ZERO3)
        if n is not None:
            min_gpus = n
            candidate = setup.replace(world_size=n, sharding=Sharding.ZERO3)
            strategies.append(Strategy(f"ZeRO-3 over {n} GPUs", candidate, _total(spec, candidate, gpu, overheads),
                                       True, _largest(lambda b: under(candidate.replace(batch=b)), MAX_SEARCH)))
    recipes = []
    for precision in Precision:
        if precision is setup.precision:
            recipes.append(Strategy(str(precision), setup, est.total_bytes, fits, max_batch))
            continue
        try:
            candidate = setup.replace(precision=precision)
            check_flags(candidate)
        except ValueError:  # a recipe this setup cannot run (flash attention in fp32)
            continue
        total = _total(spec, candidate, gpu, overheads)
        recipes.append(Strategy(str(precision), candidate, total, total <= memory_bytes,
                                _largest(lambda b, c=candidate: under(c.replace(batch=b)), MAX_SEARCH)))
    return FitResult(spec.name, memory_bytes, setup, est, fits, max_batch, max_seq, strategies, min_gpus, recipes)


def _ladder(setup: Setup, lora_targets: tuple[str, ...]):
    """Cumulative memory savers, in order of what they cost the run: precision (none for
    bf16-capable GPUs), recomputation (~1/3 more compute, Chen et al. 2016), 8-bit
    optimizer state, then fewer trainable parameters (LoRA), then a 4-bit base (QLoRA).
    A full-training setup switched to LoRA adapts ``lora_targets`` (the model's default)."""
    if setup.mode is Mode.FULL:
        setup = setup.replace(lora_targets=lora_targets)
    if not setup.training:
        if setup.precision is Precision.FP32:
            yield "bf16 weights", setup.replace(precision=Precision.BF16)
        yield "int8 weights", setup.replace(precision=Precision.BF16, quant=Quant.INT8)
        yield "nf4 weights", setup.replace(precision=Precision.BF16, quant=Quant.NF4)
        return
    current = setup
    if setup.mode is Mode.FULL:
        if current.precision is not Precision.BF16:
            current = current.replace(precision=Precision.BF16)
            yield "bf16", current
        if not current.grad_ckpt:
            current = current.replace(grad_ckpt=True)
            yield "bf16 + checkpointing", current
        if current.optimizer is Optimizer.ADAMW:
            current = current.replace(optimizer=Optimizer.ADAMW_8BIT, optimizer_impl="auto")
            yield "bf16 + checkpointing + 8-bit AdamW", current
    if setup.mode in (Mode.FULL,):
        lora = setup.replace(mode=Mode.LORA, precision=Precision.BF16, optimizer=Optimizer.ADAMW)
        yield "LoRA (bf16 base)", lora
        yield "LoRA + checkpointing", lora.replace(grad_ckpt=True)
    if setup.mode in (Mode.FULL, Mode.LORA):
        yield "QLoRA (nf4) + checkpointing", setup.replace(
            mode=Mode.QLORA, quant=Quant.NF4, precision=Precision.BF16, optimizer=Optimizer.ADAMW, grad_ckpt=True)
