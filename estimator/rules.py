"""The seed's rules of thumb ("解析探索大型語言模型：模型發展歷史、訓練及微調技術的 VRAM 估算",
Deep Learning 101, 2023-04-12), reproduced
beside the detailed estimate, each difference named by its cause. Rules speak GB (10**9)."""
from __future__ import annotations

from dataclasses import dataclass

from .categories import Category
from .estimate import Estimate, estimate
from .gpus import get_gpu
from .modelspec import load_model
from .setup import Mode, Precision, Quant, Setup, Sharding
from .sharding import smallest_world
from .units import BILLION, FP32, GB

#: (size label, shipped model standing for it)
SIZES = (("1B", "tinyllama-1.1b"), ("7B", "llama-2-7b"), ("70B", "llama-2-70b"))


@dataclass(frozen=True)
class Rule:
    setting: str
    short: str  # the setting with its recipe in at most 22 characters, for an 80-column table
    #: GB per billion parameters (X), or None when the rule is a fixed published range
    per_billion: float | None
    setup: Setup
    #: published ranges in GB for the sizes the seed names ({"7B": (100, 140)})
    ranges: tuple[tuple[str, tuple[float, float | None]], ...] = ()


RULES = (
    Rule("inference fp32 (4X)", "inference fp32 4X", 4, Setup(mode=Mode.INFERENCE, precision=Precision.FP32)),
    Rule("inference fp16/bf16 (2X)", "inference bf16 2X", 2, Setup(mode=Mode.INFERENCE, precision=Precision.BF16)),
    Rule("inference int8 (1X)", "inference int8 1X", 1,
         Setup(mode=Mode.INFERENCE, precision=Precision.BF16, quant=Quant.INT8)),
    Rule("full training fp32 (16X + acts)", "train fp32 16X", 16, Setup(precision=Precision.FP32)),
    # the seed's 12X (2 + 2 + 8: 16-bit weights and gradients, fp32 Adam moments) is no recipe
    # a framework runs: the nearest is mixed-bf16, which adds the fp32 master weights (a cause)
    Rule("full training fp16/bf16 (12X + acts)", "train mixed-bf16 12X", 12, Setup(precision=Precision.MIXED_BF16)),
    Rule("full fine-tuning (7B: 100-140 GB; 70B: > 1 TB)", "fine-tune mixed-bf16", None,
         Setup(precision=Precision.MIXED_BF16), (("7B", (100.0, 140.0)), ("70B", (1000.0, None)))),
    Rule("LoRA (7B: 16-24 GB; 70B: 140-200 GB)", "LoRA bf16", None, Setup(mode=Mode.LORA, precision=Precision.BF16),
         (("7B", (16.0, 24.0)), ("70B", (140.0, 200.0)))),
)


@dataclass(frozen=True)
class Cause:
    """One named part of the difference between the estimate and the rule."""

    name: str  # a word or two: "activations", "master weights"
    why: str   # the sentence the wide table shows
    bytes: int


@dataclass(frozen=True)
class RuleRow:
    size: str
    model: str
    params: int
    setting: str
    rule_low_bytes: int | None
    rule_high_bytes: int | None
    estimate: Estimate
    causes: list[Cause]  # what the estimate adds over the rule, by cause
    #: training rows: (ranks, per-rank bytes) of the smallest ZeRO-3 world on PER_GPU that fits
    per_gpu: tuple[int, int] | None = None
    short: str = ""

    def to_dict(self) -> dict:
        return {"size": self.size, "model": self.model, "params": self.params, "setting": self.setting,
                "rule_low_bytes": self.rule_low_bytes, "rule_high_bytes": self.rule_high_bytes,
                "estimate_total_bytes": self.estimate.total_bytes,
                "per_gpu": None if self.per_gpu is None else
                {"gpu": PER_GPU, "ranks": self.per_gpu[0], "bytes_per_rank": self.per_gpu[1]},
                "causes": [{"cause": c.why, "name": c.name, "bytes": c.bytes} for c in self.causes]}

    @property
    def difference_bytes(self) -> int | None:
        if self.rule_low_bytes is None:
            return None
        if self.rule_high_bytes is not None and self.estimate.total_bytes <= self.rule_high_bytes:
            return max(0, self.estimate.total_bytes - self.rule_low_bytes) if \
                self.estimate.total_bytes < self.rule_low_bytes else 0
        return self.estimate.total_bytes - (self.rule_high_bytes or self.rule_low_bytes)


def _causes(rule: Rule, est: Estimate, x_billions: float) -> list[Cause]:
    """Split estimate - rule into named causes."""
    c = est.components
    n = est.params
    out: list[Cause] = []
    if rule.per_billion is not None:
        # the rule's model states, X * bytes/param, against ours category by category
        states = c[Category.WEIGHTS] + c[Category.GRADIENTS] + c[Category.OPTIMIZER_STATE]
        rule_states = int(rule.per_billion * x_billions * GB)
        if rule.setup.precision is Precision.MIXED_BF16:
            out.append(Cause("master weights", "fp32 master weights (ZeRO's 16 bytes/param, not 12)", FP32 * n))
            states -= FP32 * n
        if rule.setup.quant is Quant.INT8:
            out.append(Cause("16-bit rest", "int8 scales + non-quantized embeddings, norms, lm_head in 16-bit",
                             states - rule_states))
            states = rule_states
        if states != rule_states:
            out.append(Cause("states", "model states at the step's peak phase vs the rule's sum",
                             states - rule_states))
    for cat, name, why in ((Category.ACTIVATIONS, "activations",
                            "activations saved for backward / prefill working set"),
                           (Category.LOGITS, "logits", "logits and the fp32 loss upcast"),
                           (Category.KV_CACHE, "KV cache", "KV cache"),
                           (Category.TEMPORARIES, "temporaries", "optimizer step temporaries, cuBLAS workspace"),
                           (Category.ALLOCATOR, "allocator", "caching-allocator rounding"),
                           (Category.CONTEXT, "context", "CUDA context")):
        if c[cat] >= GB // 100:  # causes under 0.01 GB are not worth a line
            out.append(Cause(name, why, c[cat]))
    return out


#: the GPU the per-GPU column is sized for
PER_GPU = "h100-80gb"


def _per_gpu(spec, setup: Setup) -> tuple[int, int] | None:
    """Smallest power-of-two ZeRO-3 world whose per-rank peak fits one PER_GPU."""
    if not setup.training:
        return None
    n = smallest_world(spec, setup, get_gpu(PER_GPU).memory_bytes, estimate, Sharding.ZERO3, powers_of_two=True)
    if n is None:
        return None
    return n, estimate(spec, setup if n == 1 else setup.replace(world_size=n, sharding=Sharding.ZERO3)).total_bytes


def rules_table(batch: int = 1, seq: int = 512) -> list[RuleRow]:
    rows: list[RuleRow] = []
    for size, model in SIZES:
        spec = load_model(model)
        for rule in RULES:
            ranges = dict(rule.ranges)
            if rule.per_billion is None and size not in ranges:
                continue
            setup = rule.setup.replace(batch=batch, seq=seq)
            est = estimate(spec, setup)
            x = est.params / BILLION
            if rule.per_billion is not None:
                low = high = int(rule.per_billion * x * GB)
            else:
                lo, hi = ranges[size]
                low, high = int(lo * GB), (int(hi * GB) if hi is not None else None)
            rows.append(RuleRow(size, model, est.params, rule.setting, low, high, est,
                                _causes(rule, est, x), _per_gpu(spec, setup), rule.short))
    return rows
