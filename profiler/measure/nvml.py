"""NVML sampling in a background thread (nvidia-ml-py, ``import pynvml``).

Missing NVML degrades loudly: one sentence in the record, the rest still measured.
Per-process memory may be unavailable inside containers and VMs (NVML's
``nvmlDeviceGetComputeRunningProcesses`` lists host pids, or reports no usedGpuMemory); the
device's used memory minus the idle baseline is the fallback.
"""
from __future__ import annotations

import os
import threading
import time

#: Sampling period: a few ms, enough to catch phase peaks of steps lasting >= 10 ms.
SAMPLE_PERIOD_S = 0.005
MAX_TIMELINE_POINTS = 2000  # kept in the record for the report's timeline plot


class NvmlSampler:
    def __init__(self, device_index: int = 0, period_s: float = SAMPLE_PERIOD_S):
        self.period_s = period_s
        self.device_index = device_index
        self.available = False
        self.message = ""
        self.driver = ""
        self.samples: list[tuple[float, int, int | None]] = []  # (t, device used, process used)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.driver = _text(pynvml.nvmlSystemGetDriverVersion())
            self.available = True
        except ImportError:
            self.message = "pynvml module not found, please install nvidia-ml-py; NVML figures are left out"
        except Exception as exc:  # NVMLError_LibraryNotFound, no driver
            self.message = f"NVML is not usable here ({type(exc).__name__}); NVML figures are left out"

    def used(self) -> tuple[int, int | None]:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        proc = None
        try:
            for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    proc = int(p.usedGpuMemory)
        except Exception:
            proc = None  # not visible in many containers
        return int(info.used), proc

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def start(self) -> None:
        if not self.available:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            used, proc = self.used()
            self.samples.append((time.perf_counter() - t0, used, proc))
            time.sleep(self.period_s)

    def stop(self) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def timeline(self, max_points: int = MAX_TIMELINE_POINTS) -> list[tuple[float, int]]:
        """(seconds, device used bytes), every n-th sample so at most max_points remain."""
        step = max(1, -(-len(self.samples) // max_points))
        return [(round(t, 4), used) for t, used, _ in self.samples[::step]]

    def peak(self) -> tuple[int | None, int | None]:
        if not self.samples:
            return None, None
        dev = max(s[1] for s in self.samples)
        procs = [s[2] for s in self.samples if s[2] is not None]
        return dev, (max(procs) if procs else None)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
