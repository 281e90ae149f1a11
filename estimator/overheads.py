"""Constant overheads beyond tensors, as named defaults with their sources.

A calibration file (``vramlab calibrate``) replaces them with fitted values; until
then these are the defaults, each cited.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .units import MiB

#: CUDA context as NVML sees it after torch initialises CUDA with lazy module loading:
#: 300-500 MiB with lazy module loading (CUDA_MODULE_LOADING=LAZY, the default since CUDA
#: 11.7: CUDA C++ Programming Guide, "Lazy Loading"); the upper end is taken until a CUDA
#: record measures it (campaign records carry nvml_context_bytes).
CUDA_CONTEXT_BYTES = 500 * MiB

#: cuBLAS workspace PyTorch allocates through its caching allocator per handle/stream
#: (aten/src/ATen/cuda/CublasHandlePool.cpp, getChosenWorkspaceSize: 4096 KiB * 8 =
#: 32 MiB on compute capability >= 9.0 (Hopper); 4096 KiB * 2 + 16 KiB * 8 before).
CUBLAS_WORKSPACE_HOPPER_BYTES = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OLDER_BYTES = 4096 * 1024 * 2 + 16 * 1024 * 8

#: CUDACachingAllocator rounds large blocks (> 1 MiB) up to multiples of kRoundLarge =
#: 2 MiB (c10/cuda/CUDACachingAllocator.cpp); with uniform remainders a live large
#: tensor wastes half of that on average.
ALLOCATOR_ROUND_LARGE_BYTES = 2 * MiB


@dataclass(frozen=True)
class Overheads:
    """The overhead model in force: defaults, or a calibration's fitted values."""

    context_bytes: int = CUDA_CONTEXT_BYTES
    workspace_bytes: int = CUBLAS_WORKSPACE_HOPPER_BYTES
    allocator_per_large_tensor_bytes: int = ALLOCATOR_ROUND_LARGE_BYTES // 2
    activation_factor: float = 1.0  # multiplies the activation formula (1.0 = uncalibrated)
    #: fitted factors per calibration key (``calibration_key``); missing keys use activation_factor
    activation_factors: Mapping[str, float] = field(default_factory=dict, hash=False, compare=False)
    #: a fitted constant added to every phase's temporaries (what no formula term explains)
    constant_bytes: int = 0
    #: fitted reserved - allocated as a fraction of allocated; None: the rounding model above
    #: (only for the cpu-device fallback: on CUDA the allocator replay gives reserved memory)
    allocator_fraction: float | None = None
    source: str = "defaults (estimator/overheads.py)"
    #: the measured spread of the reserved and device-total figures on CUDA records (a
    #: calibration's ``margins``, profiler/analysis/nontensor.py): ``fit``'s safe / uncertain
    margins: Mapping | None = field(default=None, hash=False, compare=False)

    def factor_for(self, key: str) -> float:
        return self.activation_factors.get(key, self.activation_factor)


def calibration_key(family: str, attn: str, precision: str) -> str:
    """The group a fitted activation factor belongs to: family x attention kernel x
    precision class (fp32, half, amp)."""
    if precision == "fp32":
        cls = "fp32"
    elif precision.startswith("amp"):
        cls = "amp"
    else:
        cls = "half"
    return f"{family}|{attn}|{cls}"


DEFAULT = Overheads()


def workspace_for(architecture: str) -> int:
    return CUBLAS_WORKSPACE_HOPPER_BYTES if architecture in ("hopper", "blackwell") \
        else CUBLAS_WORKSPACE_OLDER_BYTES
