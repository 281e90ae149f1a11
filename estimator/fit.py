"""fit(): what fits in a memory budget — a verdict (safe / uncertain / does_not_fit) for the
setup as given, the largest batch and the longest sequence that are safe, and the
strategies that bring a setup under the budget, cheapest first.

What decides is the device total: the caching allocator's reserved memory (the replay of
the estimate's allocation sequence, estimator/allocations.py) plus the memory outside it
(estimator/nontensor.py), against the card. A run dies when a cudaMalloc fails, after the
allocator has freed what it had cached and retried, not when allocated bytes reach the
card. The verdict carries the spread the committed CUDA records measured (a calibration's
``margins``: measured over predicted, leave-one-out for the non-tensor constants): safe if
even the worst under-prediction seen would fit, does_not_fit if even the worst
over-prediction seen would not (after the allocator's retries), uncertain between.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .calibration import committed_margins
from .cli_args import check_flags
from .estimate import Estimate, estimate
from .gpus import GPU
from .modelspec import ModelSpec
from .nontensor import non_tensor
from .overheads import DEFAULT, Overheads
from .params import default_lora_targets
from .setup import Mode, Optimizer, Precision, Quant, Setup, Sharding
from .sharding import smallest_world
from .units import GiB

MAX_SEARCH = 1 << 20  # upper bound for batch and sequence searches


class Verdict(str, Enum):
    """Whether a setup runs on the card, given how far the estimate has been from measurements."""

    SAFE = "safe"  # fits even if the estimate is as low as the worst case measured
    UNCERTAIN = "uncertain"  # inside the measured spread of the estimate
    DOES_NOT_FIT = "does_not_fit"  # does not fit even if the estimate is as high as the worst case measured

    def __str__(self) -> str:
        return self.value


class Limit(str, Enum):
    """What the budget limits."""

    CARD = "card"  # the device: reserved + non-tensor memory must fit (nvidia-smi's view)
    # the caching allocator alone: torch.cuda.set_per_process_memory_fraction caps what it may
    # reserve (CUDACachingAllocator.cpp alloc_block: total_allocated_memory + size >
    # allowed_memory_maximum fails the cudaMalloc), the context and libraries aside
    ALLOCATOR = "allocator"


@dataclass(frozen=True)
class Margin:
    """The measured spread of one figure: measured over predicted bytes, the lowest and
    the highest ratio seen, over how many cases, from where."""

    min_ratio: float
    max_ratio: float
    cases: int
    source: str


#: with no measured spread at all (no CUDA calibration): none assumed, and said so
NO_MARGIN = Margin(1.0, 1.0, 0, "no CUDA records to measure a spread on: the estimate as it is")


def margins_for(overheads: Overheads) -> dict[str, Margin]:
    """The margins of the calibration in force, else of the committed CUDA calibrations."""
    found, source = (overheads.margins, overheads.source) if overheads.margins else committed_margins()
    out = {}
    for name in ("reserved", "total"):
        m = (found or {}).get(name)
        out[name] = Margin(m["min_ratio"], m["max_ratio"], m["cases"], source) if m else NO_MARGIN
    return out


@dataclass(frozen=True)
class Judgement:
    """A setup against the budget: the three figures, the verdict and the figure that
    decides it (the device total on a card; reserved under an allocator cap; allocated
    when the tensors alone cannot fit)."""

    allocated_bytes: int
    reserved_bytes: int
    total_bytes: int
    non_tensor_bytes: int
    verdict: Verdict
    deciding: str
    retries: bool = False  # fits only because the allocator frees its cache and retries

    def to_dict(self) -> dict:
        return {"verdict": self.verdict.value, "deciding": self.deciding, "allocated_bytes": self.allocated_bytes,
                "reserved_bytes": self.reserved_bytes, "total_bytes": self.total_bytes,
                "non_tensor_bytes": self.non_tensor_bytes, "needs_allocator_retries": self.retries}


def judge(est: Estimate, memory_bytes: int, margin: Margin, limit: Limit = Limit.CARD) -> Judgement:
    """Safe / uncertain / does_not_fit for one estimate. The figure is the device total
    (reserved + non-tensor) against a card, reserved alone against an allocator cap; a
    figure over the budget may still run when the allocator, refused a cudaMalloc, frees
    its cached blocks and retries, so the verdict then replays the step under that
    capacity (Estimate.runs_within)."""
    outside = est.non_tensor_bytes if limit is Limit.CARD else 0
    figure = est.total_bytes if limit is Limit.CARD else est.reserved_bytes
    name = "device total (reserved + non-tensor)" if limit is Limit.CARD else "reserved"
    numbers = (est.allocated_bytes, est.reserved_bytes, est.total_bytes, est.non_tensor_bytes)
    if (est.allocated_bytes + outside) * margin.min_ratio > memory_bytes:
        return Judgement(*numbers, Verdict.DOES_NOT_FIT, "allocated (the tensors alone)")
    if figure * margin.max_ratio <= memory_bytes:
        return Judgement(*numbers, Verdict.SAFE, name)
    # over the budget at the worst measured spread: what the allocator's retries leave
    if est.runs_within(int(memory_bytes / margin.max_ratio) - outside):
        return Judgement(*numbers, Verdict.SAFE, f"{name}, with the allocator's retries", retries=True)
    if figure * margin.min_ratio <= memory_bytes or est.runs_within(int(memory_bytes / margin.min_ratio) - outside):
        return Judgement(*numbers, Verdict.UNCERTAIN, name, retries=figure * margin.min_ratio > memory_bytes)
    return Judgement(*numbers, Verdict.DOES_NOT_FIT, name)


@dataclass(frozen=True)
class Strategy:
    name: str
    setup: Setup
    total_bytes: int
    fits: bool  # its verdict is not does_not_fit
    max_batch: int  # the largest safe batch at its seq
    verdict: Verdict = Verdict.UNCERTAIN


@dataclass(frozen=True)
class FitResult:
    model: str
    memory_bytes: int
    setup: Setup
    estimate: Estimate
    fits: bool  # the point estimate's device total fits the budget
    max_batch: int  # the largest safe batch at the setup's seq; 0 when even batch 1 is not safe
    max_seq: int  # the longest safe seq at the setup's batch; 0 when not even 1 token is
    strategies: list[Strategy] = field(default_factory=list)
    min_gpus: int | None = None  # ZeRO-3 ranks needed for the setup as given
    #: the setup as given under each precision recipe (named by it), the given one included:
    #: "batch 9 fits" in pure bf16 says nothing of a Trainer's amp-bf16 run
    recipes: list[Strategy] = field(default_factory=list)
    judgement: Judgement | None = None
    margin: Margin = NO_MARGIN  # the spread the verdict used
    limit: Limit = Limit.CARD

    def verdict(self) -> str:
        """One sentence about the setup as given: the verdict, the figure that decides it,
        and, when it is not safe, what would be (``min_gpus`` only when it does not fit)."""
        j = self.judgement
        budget = self.memory_bytes / GiB
        recipe = f"(precision {self.setup.precision})"
        spread = (f"measured spread {100 * (self.margin.min_ratio - 1):+.1f} % to "
                  f"{100 * (self.margin.max_ratio - 1):+.1f} %, {self.margin.cases} CUDA cases")
        figure = j.total_bytes if self.limit is Limit.CARD and not j.deciding.startswith("allocated") else \
            (j.allocated_bytes + j.non_tensor_bytes if j.deciding.startswith("allocated") else j.reserved_bytes)
        said = {Verdict.SAFE: "is safe", Verdict.UNCERTAIN: "is uncertain",
                Verdict.DOES_NOT_FIT: "does not fit"}[j.verdict]
        head = (f"The setup as given {said} {recipe}: {j.deciding} "
                f"{figure / GiB:.2f} of {budget:.2f} GiB ({spread})")
        if j.verdict is Verdict.SAFE:
            return head + "."
        one_gpu = any(s.verdict is Verdict.SAFE for s in self.strategies if s.setup.world_size == 1)
        text = head + "; " + ("a one-GPU strategy above is safe" if one_gpu else "no one-GPU strategy above is safe")
        if self.min_gpus:
            text += f"; ZeRO-3 needs {self.min_gpus} GPUs of this size"
        return text + "."

    def to_dict(self) -> dict:
        return {
            "model": self.model, "memory_bytes": self.memory_bytes, "fits": self.fits,
            "limit": self.limit.value,
            **(self.judgement.to_dict() if self.judgement else {}),
            "margin": {"min_ratio": self.margin.min_ratio, "max_ratio": self.margin.max_ratio,
                       "cases": self.margin.cases, "source": self.margin.source},
            "max_batch": self.max_batch, "max_seq": self.max_seq,
            "min_gpus_zero3": self.min_gpus, "setup": self.setup.to_dict(),
            "strategies": [{"name": s.name, "total_bytes": s.total_bytes, "verdict": s.verdict.value, "fits": s.fits,
                            "max_batch": s.max_batch, "setup": s.setup.to_dict()} for s in self.strategies],
            "recipes": [{"precision": s.name, "total_bytes": s.total_bytes, "verdict": s.verdict.value,
                         "fits": s.fits, "max_batch": s.max_batch} for s in self.recipes],
        }


def _largest(fits: Callable[[int], bool], hi: int, start: int = 1) -> int:
    """Largest n in [1, hi] with fits(n), fits monotone decreasing; 0 if none. ``start``: a
    guess near the answer: gallop from it (up while it fits, down while it does not), then
    bisect, so a good guess costs two calls."""
    if hi < 1:
        return 0
    start = max(1, min(start, hi))
    if fits(start):
        lo, step = start, 1
        while lo + step <= hi and fits(lo + step):
            lo += step
            step *= 2
        top = min(lo + step, hi + 1)  # does not fit, or past hi
    else:
        top, step = start, 1
        while top - step >= 1 and not fits(top - step):
            top -= step
            step *= 2
        lo = top - step  # fits, or 0: nothing does
        if lo < 1:
            lo = 0
    while top - lo > 1:
        mid = (lo + top) // 2
        if fits(mid):
            lo = mid
        else:
            top = mid
    return lo


class _Judge:
    """Verdicts of one spec's setups against one budget, each estimate and verdict made
    once. The searches first bound the answer by the tensors alone (no replay: a safe run
    needs its allocated bytes and the non-tensor memory under the budget), then guess it
    from the reserved/allocated ratio of the setup as given, and replay only around it."""

    def __init__(self, spec, gpu, overheads, memory: int, margin: Margin, limit: Limit):
        self.spec, self.gpu, self.overheads, self.memory, self.margin, self.limit = \
            spec, gpu, overheads, memory, margin, limit
        self._est: dict = {}
        self._verdict: dict = {}

    def estimate(self, setup: Setup) -> Estimate:
        est = self._est.get(setup)
        if est is None:
            est = self._est[setup] = estimate(self.spec, setup, self.gpu, self.overheads)
        return est

    def outside(self, setup: Setup) -> int:
        return non_tensor(setup, self.gpu, self.overheads).total if self.limit is Limit.CARD else 0

    def judge(self, setup: Setup) -> Judgement:
        j = self._verdict.get(setup)
        if j is None:
            j = self._verdict[setup] = judge(self.estimate(setup), self.memory, self.margin, self.limit)
        return j

    def safe(self, setup: Setup) -> bool:
        return self.judge(setup).verdict is Verdict.SAFE

    def possible(self, setup: Setup, cache: int = 0) -> bool:
        """Cheap (no replay): the tensors, the non-tensor memory and ``cache`` bytes of the
        allocator's cache under the budget at the worst measured spread."""
        est = self.estimate(setup)
        return (est.allocated_bytes + self.outside(setup) + cache) * self.margin.max_ratio <= self.memory

    def overhead(self, setup: Setup) -> int:
        """What the allocator's cache adds to the tensors (the figure less the tensors and the
        non-tensor memory)."""
        est = self.estimate(setup)
        figure = est.total_bytes if self.limit is Limit.CARD else est.reserved_bytes
        return max(figure - est.allocated_bytes - self.outside(setup), 0)

    def largest(self, base: Setup, field_name: str, hi: int, exact: bool = True) -> int:
        """The largest value of ``field_name`` (batch or seq) that keeps ``base`` safe: bounded
        by the tensors alone, guessed from what the allocator's cache adds at the setup as given
        and again at each guess (no replay for the bound), then searched from the guess.
        ``exact=False`` (the strategy and recipe rows): the guess once verified safe is the
        answer, a lower bound on the largest (searched down from it where it is not)."""
        make = lambda n: base.replace(**{field_name: n})  # noqa: E731
        bound = _largest(lambda n: self.possible(make(n)), hi, getattr(base, field_name))
        if bound == 0:
            return 0
        guess = min(getattr(base, field_name), bound)
        for _ in range(3):  # the cache where the answer will be is closer to the answer
            cache = self.overhead(make(guess))
            new = _largest(lambda n, c=cache: self.possible(make(n), c), bound, guess) or 1
            if new == guess:
                break
            guess = new
        if not exact and self.safe(make(guess)):
            return guess
        return _largest(lambda n: self.safe(make(n)), bound if exact else guess, guess)


def _total(spec, setup, gpu, overheads) -> int:
    return estimate(spec, setup, gpu, overheads).total_bytes


def fit(spec: ModelSpec, setup: Setup, memory_bytes: int, gpu: GPU | None = None,
        overheads: Overheads = DEFAULT, limit: Limit = Limit.CARD) -> FitResult:
    """The setup against a budget of ``memory_bytes``: the verdict and its figures, the
    largest safe batch and sequence, the strategies and recipes with theirs. ``limit``:
    what the budget limits, the card (default) or the caching allocator alone."""
    if memory_bytes <= 0:
        raise ValueError(f"memory must be positive, got {memory_bytes}")
    limit = Limit(limit)
    margin = margins_for(overheads)["total" if limit is Limit.CARD else "reserved"]
    j = _Judge(spec, gpu, overheads, memory_bytes, margin, limit)
    est = j.estimate(setup)
    judgement = j.judge(setup)
    max_pos = spec.max_positions - setup.new_tokens if spec.max_positions else MAX_SEARCH
    max_batch = j.largest(setup, "batch", MAX_SEARCH)
    max_seq = j.largest(setup, "seq", max(max_pos, 1))

    def strategy(name: str, candidate: Setup) -> Strategy:
        v = j.judge(candidate)
        return Strategy(name, candidate, v.total_bytes, v.verdict is not Verdict.DOES_NOT_FIT,
                        j.largest(candidate, "batch", MAX_SEARCH, exact=False), v.verdict)

    strategies = [strategy(name, candidate) for name, candidate in _ladder(setup, default_lora_targets(spec))]
    figure = est.total_bytes if limit is Limit.CARD else est.reserved_bytes
    fits = figure <= memory_bytes
    min_gpus = None
    if setup.training and setup.sharding is Sharding.NONE and judgement.verdict is not Verdict.SAFE \
            and _zero3_modelled(setup):
        n = smallest_world(spec, setup, memory_bytes, lambda sp, su: j.estimate(su), Sharding.ZERO3,
                           lower_bound=lambda sp, su: j.estimate(su).allocated_bytes + j.outside(su))
        if n is not None:
            min_gpus = n
            strategies.append(strategy(f"ZeRO-3 over {n} GPUs", setup.replace(world_size=n, sharding=Sharding.ZERO3)))
    recipes = []
    for precision in Precision:
        if precision is setup.precision:
            recipes.append(Strategy(str(precision), setup, est.total_bytes,
                                    judgement.verdict is not Verdict.DOES_NOT_FIT, max_batch, judgement.verdict))
            continue
        try:
            candidate = setup.replace(precision=precision)
            check_flags(candidate)
        except ValueError:  # a recipe this setup cannot run (flash attention in fp32)
            continue
        recipes.append(strategy(str(precision), candidate))
    return FitResult(spec.name, memory_bytes, setup, est, fits, max_batch, max_seq, strategies, min_gpus, recipes,
                     judgement, margin, limit)


def _zero3_modelled(setup: Setup) -> bool:
    """Whether the setup has a ZeRO-3 estimate (--trainer dpo has none yet: Setup refuses it)."""
    try:
        setup.replace(world_size=2, sharding=Sharding.ZERO3)
    except ValueError:
        return False
    return True


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
