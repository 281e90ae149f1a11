"""Device memory outside the caching allocator, by source: what NVML (nvidia-smi) sees
beyond ``max_memory_reserved``. Each source is named and says where its bytes come from.

- ``cuda_context``: the CUDA context of the process (driver state, the runtime's heap,
  the modules loaded at initialisation). Measured per GPU and driver where a record
  measured it (``gpus.json`` ``measured_non_tensor``; the H200's: 645,464,064 bytes, 615.6
  MiB, driver 580.159.04, CUDA 13.0); a calibration's ``context_bytes`` replaces it;
  otherwise the overheads' default (``overheads.CUDA_CONTEXT_BYTES``).
- ``cuda_modules``: kernel modules CUDA loads lazily at a kernel's first launch
  (``CUDA_MODULE_LOADING=LAZY``, the default since CUDA 11.7: CUDA C++ Programming Guide,
  "Lazy Loading"), measured at the step's peak: a training step loads more (backward and
  optimizer kernels) than a forward-only one. From the GPU's own measurement, else the
  only one there is (the H200's), named as such.
- ``nccl``: NCCL's communication buffers on each rank of a multi-GPU run: per channel and
  per connected peer one buffer per protocol, Simple ``NCCL_BUFFSIZE`` (default
  ``DEFAULT_BUFFSIZE`` = 4 MiB), LL (``DEFAULT_LL_BUFFSIZE`` = 8 lines x 512 threads x
  8 steps x 16 bytes = 512 KiB) and LL128 (``DEFAULT_LL128_BUFFSIZE`` = 120 elements x 640
  threads x 8 steps x 8 bytes = 4.69 MiB) (NVIDIA/nccl src/init.cc ``computeBuffSizes``,
  src/include/device.h; NCCL docs, Environment Variables: NCCL_BUFFSIZE,
  NCCL_LL_BUFFSIZE, NCCL_LL128_BUFFSIZE, NCCL_MIN_NCHANNELS / NCCL_MAX_NCHANNELS). A ring
  connects each rank to two peers per channel (the previous and the next); the channel
  count is topology-dependent (``NCCL_DEBUG=INFO`` prints it), ``NCCL_CHANNELS`` assumed.

cuBLAS / cuBLASLt workspaces are not here: PyTorch allocates them through the caching
allocator (aten/src/ATen/cuda/CublasHandlePool.cpp ``getCurrentCUDABlasHandle`` /
``getCUDABlasLtWorkspace``), so they are part of reserved memory (estimator/allocations.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .gpus import GPU, gpu_presets
from .overheads import CUDA_CONTEXT_BYTES, DEFAULT, Overheads
from .setup import Device, Setup
from .units import KiB, MiB

#: NVIDIA/nccl src/init.cc: DEFAULT_BUFFSIZE (1 << 22), the Simple protocol's buffer
NCCL_SIMPLE_BYTES = 4 * MiB
#: src/include/device.h: NCCL_LL_LINES_PER_THREAD 8 x NCCL_LL_MAX_NTHREADS 512 x NCCL_STEPS 8
#: x sizeof(union ncclLLFifoLine) 16
NCCL_LL_BYTES = 8 * 512 * 8 * 16
#: NCCL_LL128_ELEMS_PER_THREAD 120 x NCCL_LL128_MAX_NTHREADS 640 x NCCL_STEPS 8 x sizeof(uint64_t)
NCCL_LL128_BYTES = 120 * 640 * 8 * 8
#: ring peers per channel: the previous and the next rank
NCCL_RING_PEERS = 2
#: channels assumed where the topology is unknown: NCCL's ring on NVLink-connected Hopper
#: GPUs (H100 SXM NVLink 4: 18 links; NCCL opens 16 or more channels there, bounded by
#: NCCL_MAX_NCHANNELS, MAXCHANNELS = 32 in src/include/device.h)
NCCL_CHANNELS = 16
#: the GPU whose measurements stand in for a GPU without its own
REFERENCE_GPU = "h200-141gb"



@dataclass(frozen=True)
class Source:
    name: str
    bytes: int
    label: str


@dataclass(frozen=True)
class NonTensor:
    """Memory outside the caching allocator, by source."""

    sources: tuple[Source, ...]

    @property
    def total(self) -> int:
        return sum(s.bytes for s in self.sources)

    def to_dict(self) -> dict:
        return {s.name: {"bytes": s.bytes, "source": s.label} for s in self.sources}


def _measured(gpu: GPU | None) -> tuple[dict | None, str]:
    if gpu is not None and gpu.measured_non_tensor:
        return dict(gpu.measured_non_tensor), f"measured on {gpu.name}"
    ref = gpu_presets().get(REFERENCE_GPU)
    if ref is not None and ref.measured_non_tensor:
        return dict(ref.measured_non_tensor), f"measured on {ref.name} (no measurement of this GPU)"
    return None, ""


def non_tensor(setup: Setup, gpu: GPU | None = None, overheads: Overheads = DEFAULT) -> NonTensor:
    """The non-tensor memory of one rank of ``setup`` (nothing on the cpu device)."""
    if setup.device is not Device.CUDA:
        return NonTensor(())
    measured, where = _measured(gpu)
    own = gpu is not None and gpu.measured_non_tensor
    if overheads.context_bytes != CUDA_CONTEXT_BYTES:
        context = Source("cuda_context", overheads.context_bytes, f"CUDA context: {overheads.source}")
    elif own:
        m = gpu.measured_non_tensor
        context = Source("cuda_context", int(m["cuda_context_bytes"]),
                         f"CUDA context {where} (driver {m.get('driver')}, CUDA {m.get('cuda')})")
    else:
        context = Source("cuda_context", overheads.context_bytes,
                         "CUDA context: default (estimator/overheads.py CUDA_CONTEXT_BYTES)")
    sources = [context]
    if measured:
        kind = "training" if setup.training else "forward"
        sources.append(Source("cuda_modules", int(measured["module_bytes"][kind]),
                              f"kernel modules loaded lazily by a {kind} step, {where} "
                              f"(torch {measured.get('torch')})"))
    if setup.world_size > 1:
        per = NCCL_SIMPLE_BYTES + NCCL_LL_BYTES + NCCL_LL128_BYTES
        sources.append(Source("nccl", NCCL_CHANNELS * NCCL_RING_PEERS * per,
                              f"NCCL buffers: {NCCL_CHANNELS} channels x {NCCL_RING_PEERS} ring peers x "
                              f"(Simple {NCCL_SIMPLE_BYTES // MiB} MiB + LL {NCCL_LL_BYTES // KiB} KiB + "
                              f"LL128 {NCCL_LL128_BYTES / MiB:.2f} MiB)"))
    return NonTensor(tuple(sources))
