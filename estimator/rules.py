"""The seed's rules of thumb (REFERENCE.md, Deep Learning 101, 2023-04-12), reproduced
beside the detailed estimate, each difference named by its cause. Rules speak GB (10**9)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .categories import Category
from .estimate import Estimate, estimate
from .modelspec import load_model
from .gpus import get_gpu
from .setup import Mode, Precision, Quant, Setup, Sharding

GB = 10**9

#: (size label, shipped model standing for it)
SIZES = (("1B", "tinyllama-1.1b"), ("7B", "llama-2-7b"), ("70B", "llama-2-70b"))


@dataclass(frozen=True)
class Rule:
    setting: str
    #: GB per billion parameters (X), or None when the rule is a fixed published range
    per_billion: Optional[float]
    setup: Setup
    #: published ranges in GB for the sizes the seed names ({"7B": (100, 140)})
    ranges: Tuple[Tuple[str, Tuple[float, Optional[float]]], ...] = ()


RULES = (
    Rule("inference fp32 (4X)", 4, Setup(mode=Mode.INFERENCE, precision=Precision.FP32)),
    Rule("inference fp16/bf16 (2X)", 2, Setup(mode=Mode.INFERENCE, precision=Precision.BF16)),
    Rule("inference int8 (1X)", 1, Setup(mode=Mode.INFERENCE, precision=Precision.BF16, quant=Quant.INT8)),
    Rule("full training fp32 (16X + acts)", 16, Setup(precision=Precision.FP32)),
    Rule("full training fp16/bf16 (12X + acts)", 12, Setup(precision=Precision.MIXED_BF16)),
    Rule("full fine-tuning (7B: 100-140 GB; 70B: > 1 TB)", None, Setup(precision=Precision.MIXED_BF16),
         (("7B", (100.0, 140.0)), ("70B", (1000.0, None)))),
    Rule("LoRA (7B: 16-24 GB; 70B: 140-200 GB)", None, Setup(mode=Mode.LORA, precision=Precision.BF16),
         (("7B", (16.0, 24.0)), ("70B", (140.0, 200.0)))),
)


@dataclass(frozen=True)
class RuleRow:
    size: str
    model: str
    params: int
    setting: str
    rule_low_bytes: Optional[int]
    rule_high_bytes: Optional[int]
    estimate: Estimate
    causes: List[Tuple[str, int]]  # (cause, bytes the estimate adds over the rule)
    #: training rows: (ranks, per-rank bytes) of the smallest ZeRO-3 world on PER_GPU that fits
    per_gpu: Optional[Tuple[int, int]] = None

    @property
    def difference_bytes(self) -> Optional[int]:
        if self.rule_low_bytes is None:
            return None
        if self.rule_high_bytes is not None and self.estimate.total_bytes <= self.rule_high_bytes:
            return max(0, self.estimate.total_bytes - self.rule_low_bytes) if \
                self.estimate.total_bytes < self.rule_low_bytes else 0
        return self.estimate.total_bytes - (self.rule_high_bytes or self.rule_low_bytes)


def _causes(rule: Rule, est: Estimate, x_billions: float) -> List[Tuple[str, int]]:
    """Split estimate - rule into named causes."""
    c = est.components
    n = est.params
    out: List[Tuple[str, int]] = []
    if rule.per_billion is not None:
        # the rule's model states, X * bytes/param, against ours category by category
        states = c[Category.WEIGHTS] + c[Category.GRADIENTS] + c[Category.OPTIMIZER_STATE]
        rule_states = int(rule.per_billion * x_billions * GB)
        if rule.setup.precision is Precision.MIXED_BF16:
            out.append(("fp32 master weights (ZeRO's 16 bytes/param, not 12)", 4 * n))
            states -= 4 * n
        if rule.setup.quant is Quant.INT8:
            out.append(("int8 scales + non-quantized embeddings, norms, lm_head in 16-bit",
                        states - rule_states))
            states = rule_states
        if states != rule_states:
            out.append(("model states at the step's peak phase vs the rule's sum", states - rule_states))
    for cat, why in ((Category.ACTIVATIONS, "activations saved for backward / prefill working set"),
                     (Category.LOGITS, "logits and the fp32 loss upcast"),
                     (Category.KV_CACHE, "KV cache"),
                     (Category.TEMPORARIES, "optimizer step temporaries, cuBLAS workspace"),
                     (Category.ALLOCATOR, "caching-allocator rounding"),
                     (Category.CONTEXT, "CUDA context")):
        if c[cat] >= GB // 100:  # causes under 0.01 GB are not worth a line
            out.append((why, c[cat]))
    return out


#: the GPU the per-GPU column is sized for
PER_GPU = "h100-80gb"


def _per_gpu(spec, setup: Setup) -> Optional[Tuple[int, int]]:
    """Smallest power-of-two ZeRO-3 world whose per-rank peak fits one PER_GPU."""
    if not setup.training:
        return None
    memory = get_gpu(PER_GPU).memory_bytes
    n = 1
    while n <= 1024:
        candidate = setup if n == 1 else setup.replace(world_size=n, sharding=Sharding.ZERO3)
        total = estimate(spec, candidate).total_bytes
        if total <= memory:
            return n, total
        n *= 2
    return None


def rules_table(batch: int = 1, seq: int = 512) -> List[RuleRow]:
    rows: List[RuleRow] = []
    for size, model in SIZES:
        spec = load_model(model)
        for rule in RULES:
            ranges = dict(rule.ranges)
            if rule.per_billion is None and size not in ranges:
                continue
            setup = rule.setup.replace(batch=batch, seq=seq)
            est = estimate(spec, setup)
            x = est.params / 1e9
            if rule.per_billion is not None:
                low = high = int(rule.per_billion * x * GB)
            else:
                lo, hi = ranges[size]
                low, high = int(lo * GB), (int(hi * GB) if hi is not None else None)
            rows.append(RuleRow(size, model, est.params, rule.setting, low, high, est,
                                _causes(rule, est, x), _per_gpu(spec, setup)))
    return rows
