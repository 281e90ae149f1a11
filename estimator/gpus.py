"""GPU presets as data (``estimator/data/gpus.json``), looked up by name."""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

GPUS_FILE = Path(__file__).parent / "data" / "gpus.json"


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_bytes: int
    architecture: str
    compute_capability: str
    #: memory outside the caching allocator as measured on this GPU (gpus.json
    #: ``measured_non_tensor``: the CUDA context, lazily loaded kernel modules; with the
    #: driver, CUDA and torch it was measured under), None where nothing was measured
    measured_non_tensor: Mapping | None = field(default=None, hash=False, compare=False)


@lru_cache(maxsize=1)
def gpu_presets() -> dict[str, GPU]:
    data = json.loads(GPUS_FILE.read_text())
    return {key: GPU(key=key, name=v["name"], memory_bytes=int(v["memory_bytes"]),
                     architecture=v["architecture"], compute_capability=str(v["compute_capability"]),
                     measured_non_tensor=v.get("measured_non_tensor"))
            for key, v in data.items() if not key.startswith("_")}


def gpu_named(device_name: str) -> GPU | None:
    """The preset whose CUDA device name is ``device_name`` (a record's ``device.name``)."""
    for gpu in gpu_presets().values():
        if gpu.name.lower() == str(device_name or "").strip().lower():
            return gpu
    return None


def get_gpu(name: str) -> GPU:
    presets = gpu_presets()
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    if key in presets:
        return presets[key]
    matches = [k for k in presets if k.startswith(key)]
    if len(matches) == 1:
        return presets[matches[0]]
    close = sorted(matches) or difflib.get_close_matches(key, list(presets), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(presets))}"
    raise ValueError(f"unknown GPU {name!r}{hint}")
