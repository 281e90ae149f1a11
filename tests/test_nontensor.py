"""Memory outside the caching allocator, by source (estimator/nontensor.py), and the
measured numbers behind it: gpus.json's measured_non_tensor and a calibration's margins
are computed from the committed CUDA records (profiler/analysis/nontensor.py), never typed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from estimator.calibration import load_calibration
from estimator.gpus import get_gpu
from estimator.nontensor import NCCL_LL128_BYTES, NCCL_LL_BYTES, NCCL_SIMPLE_BYTES, non_tensor
from estimator.setup import Setup
from profiler.analysis.nontensor import margins, measured_non_tensor
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "results/cuda/h200/cuda-standard.jsonl"
#: a committed calibration's margins against the ones today's estimator gives on its records:
#: a calibration older than the estimator drifts by more (regenerate it with the README's
#: ``vramlab calibrate`` command)
MARGIN_DRIFT = 0.01


def test_gpus_json_holds_what_the_h200_records_measured():
    measured = measured_non_tensor(read_records(H200))
    committed = dict(get_gpu("h200").measured_non_tensor)
    assert measured["cuda_context_bytes"] == committed["cuda_context_bytes"] == 645_464_064  # 645.5 MB
    assert measured["module_bytes"] == committed["module_bytes"]


def test_nccl_buffers_follow_nccls_constants_and_the_world():
    # NVIDIA/nccl: DEFAULT_BUFFSIZE 4 MiB; LL 8 x 512 x 8 x 16 B; LL128 120 x 640 x 8 x 8 B
    assert (NCCL_SIMPLE_BYTES, NCCL_LL_BYTES, NCCL_LL128_BYTES) == (4 << 20, 524_288, 4_915_200)
    one = non_tensor(Setup(), get_gpu("h100-80gb"))
    two = non_tensor(Setup(world_size=2, sharding="ddp"), get_gpu("h100-80gb"))
    assert "nccl" not in one.to_dict() and two.to_dict()["nccl"]["bytes"] > 0
    assert non_tensor(Setup(device="cpu")).total == 0


def test_a_gpu_without_its_own_measurement_says_whose_it_uses():
    sources = non_tensor(Setup(), get_gpu("a100-80gb")).to_dict()
    assert "NVIDIA H200" in sources["cuda_modules"]["source"]
    assert "default" in sources["cuda_context"]["source"]


@pytest.mark.slow
def test_the_committed_calibration_margins_are_what_the_records_give():
    computed = margins(read_records(H200))
    committed = json.loads((ROOT / "results/calibration/cuda-h200.json").read_text())["margins"]
    for name in ("reserved", "total"):
        assert committed[name]["cases"] == computed[name]["cases"]
        for key in ("min_ratio", "max_ratio"):
            assert abs(committed[name][key] - computed[name][key]) <= MARGIN_DRIFT, (name, key)
    fitted = load_calibration(ROOT / "results/calibration/cuda-h200.json").margins
    assert fitted["total"]["max_ratio"] >= 1.0 >= fitted["total"]["min_ratio"]
