"""The ``vramlab`` CLI: JSON and table output, one-line errors with exit code 2, and no
torch/transformers import on the estimator path."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from estimator.categories import Category
from estimator.gpus import get_gpu
from estimator.units import GiB

N_LLAMA_2_7B = 6_738_415_616


def test_estimate_json(cli):
    r = cli("estimate", "llama-2-7b", "--json")
    assert r.code == 0 and r.err == ""
    d = json.loads(r.out)
    assert d["model"] == "llama-2-7b"
    assert d["params"] == N_LLAMA_2_7B
    assert d["trainable_params"] == N_LLAMA_2_7B
    assert set(d["components"]) == {c.value for c in Category}
    assert d["total_bytes"] == sum(d["components"].values())
    assert d["peak_phase"] in d["phases"]
    assert d["setup"]["precision"] == "bf16" and d["setup"]["batch"] == 1 and d["setup"]["seq"] == 512


def test_estimate_json_setup_flags(cli):
    r = cli("estimate", "llama-2-7b", "--json", "--mode", "lora", "--lora-rank", "8",
            "--lora-targets", "q_proj,k_proj,v_proj", "--batch", "4", "--seq", "1024", "--grad-ckpt")
    assert r.code == 0
    d = json.loads(r.out)
    assert d["setup"]["mode"] == "lora"
    assert d["setup"]["lora_targets"] == ["q_proj", "k_proj", "v_proj"]
    assert d["setup"]["grad_ckpt"] is True
    assert d["trainable_params"] == 32 * 8 * 3 * (4096 + 4096)


def test_estimate_table_mentions_every_category(cli):
    r = cli("estimate", "llama-2-7b")
    assert r.code == 0
    for cat in Category:
        assert cat.value in r.out
    assert "total" in r.out and "6,738,415,616" in r.out


def test_estimate_with_gpu_says_whether_it_fits(cli):
    r = cli("estimate", "llama-2-7b", "--gpu", "h100-80gb", "--mode", "lora")
    assert r.code == 0
    assert "fits on NVIDIA H100 80GB HBM3" in r.out


def test_fit_memory_json(cli):
    r = cli("fit", "llama-2-7b", "--memory", "24GiB", "--json")
    assert r.code == 0 and r.err == ""
    d = json.loads(r.out)
    assert d["memory_bytes"] == 24 * GiB
    assert d["fits"] is (d["total_bytes"] <= d["memory_bytes"])
    assert isinstance(d["max_batch"], int) and isinstance(d["max_seq"], int)
    assert d["strategies"] and all({"name", "total_bytes", "fits", "max_batch"} <= set(s) for s in d["strategies"])
    assert any(s["fits"] for s in d["strategies"])


def test_fit_gpu_json(cli):
    r = cli("fit", "llama-2-7b", "--gpu", "a100-80gb", "--json")
    assert r.code == 0
    d = json.loads(r.out)
    assert d["memory_bytes"] == get_gpu("a100-80gb").memory_bytes == 84_987_740_160


def test_fit_table(cli):
    r = cli("fit", "llama-2-7b", "--memory", "80GB")
    assert r.code == 0
    assert "largest safe batch" in r.out and "LoRA" in r.out
    assert "what decides out-of-memory" in r.out and "device total" in r.out


def test_rules(cli):
    r = cli("rules")
    assert r.code == 0 and r.err == ""
    for size in ("1B", "7B", "70B"):
        assert size in r.out


def test_rules_json(cli):
    r = cli("rules", "--json")
    assert r.code == 0
    rows = json.loads(r.out)
    assert {row["size"] for row in rows} == {"1B", "7B", "70B"}
    assert all(isinstance(row["estimate_total_bytes"], int) for row in rows)


@pytest.mark.parametrize("argv,message", [
    (["estimate", "llama-2-7b", "--batch", "0"], "batch must be a positive integer"),
    (["estimate", "llama-2-7b", "--batch", "abc"], "--batch must be an integer, got 'abc'"),
    (["estimate", "llama-2-7"], "unknown model 'llama-2-7'.*did you mean"),
    (["estimate", "llama-2-7b", "--precision", "fp8"], "unknown precision 'fp8'; choose one of: fp32"),
    (["estimate", "llama-2-7b", "--seq", "5000"], "seq 5000 is beyond llama-2-7b's 4096 positions"),
    (["estimate", "llama-2-7b", "--mode", "qlora"], "qlora needs a weight quantization"),
    (["estimate", "llama-2-7b", "--mode", "lora", "--lora-targets", "c_attn"], "LoRA target 'c_attn'"),
    (["estimate", "llama-2-7b", "--gpu", "nosuchgpu"], "unknown GPU 'nosuchgpu'"),
    (["estimate", "llama-2-7b", "--no-such-flag"], "unrecognized arguments"),
    (["fit", "llama-2-7b", "--memory", "24XB"], "unknown size unit 'XB'.*valid units: B, KB"),
    (["fit", "llama-2-7b", "--memory", "0"], "memory must be positive, got 0"),
    (["fit", "llama-2-7b", "--memory=-5GiB"], "cannot read '-5GiB' as a size"),
    (["fit", "llama-2-7b"], "fit needs exactly one of --gpu NAME or --memory SIZE"),
    (["fit", "llama-2-7b", "--gpu", "a100-80gb", "--memory", "24GiB"], "fit needs exactly one of"),
    (["rules", "--batch", "abc"], "invalid int value"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(cli, argv, message):
    r = cli(*argv)
    assert r.code == 2
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("vramlab: error: ")
    assert "Traceback" not in r.err
    assert re.search(message, lines[0]), lines[0]


# --- subprocesses: the real entry point, cold imports -----------------------------------

def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def test_module_entry_point_exit_codes():
    ok = _run("-m", "profiler.cli", "estimate", "llama-2-7b", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["params"] == N_LLAMA_2_7B
    bad = _run("-m", "profiler.cli", "estimate", "llama-2-7b", "--batch", "0")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr


def test_estimator_imports_neither_torch_nor_transformers():
    code = ("import estimator, estimator.estimate, estimator.fit, estimator.rules, estimator.report, "
            "estimator.modelspec, estimator.params, estimator.units, estimator.gpus; import sys; "
            "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
            "assert not bad, bad")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv", [
    ["estimate", "llama-2-7b", "--json"],
    ["estimate", "mixtral-8x7b", "--mode", "qlora", "--quant", "nf4"],
    ["fit", "llama-2-7b", "--memory", "24GiB", "--json"],
    ["rules"],
])
def test_cli_path_never_imports_torch(argv):
    code = ("import sys, contextlib, io\n"
            f"sys.argv = ['vramlab', *{argv!r}]\n"
            "from profiler.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(sys.argv[1:])\n"
            "assert rc == 0, rc\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
            "assert not bad, bad\n")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
