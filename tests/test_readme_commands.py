"""README commands do what they say in a checkout (issue 28): the sweep example writes a
fresh file, a sweep with nothing left to run says so, regenerating a calibration or a
report from the same records changes no committed byte, and a campaign stopped by its
budget says how to go on."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from profiler.record import Status, append_record, new_record
from profiler.sweeps.sweep import plan

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _tracked(path: str) -> bool:
    proc = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    return proc.returncode == 0


def _measure_section() -> str:
    return README.split("## Measure", 1)[1].split("\n## ", 1)[0]


def test_the_readme_sweep_example_does_not_resume_onto_committed_records():
    outs = re.findall(r"vramlab sweep \S+ .*--out (\S+)", _measure_section())
    assert outs
    for out in outs:
        if not (ROOT / ".git").exists():
            pytest.skip("not a git checkout")
        assert not _tracked(out), f"{out} is committed: the sweep would skip its cases and run none"
        for backend in ("cpu", "cuda"):  # the first README command (vramlab loop --out vramlab-out) writes these
            assert Path(out) != Path("vramlab-out") / f"{backend}-quick.jsonl", out


def test_a_sweep_with_every_case_recorded_says_there_is_nothing_to_run(cli, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                  "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}))
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'steps = 1\nprecision = "fp32"\n[[cases]]\nmodel = "{config}"\nseq = [8, 16]\n')
    out = tmp_path / "out.jsonl"
    for job in plan(matrix, "sim"):
        append_record(out, new_record(job.case, Status.ERROR, "written by the test"))
    before = out.read_bytes()
    result = cli("sweep", str(matrix), "--backend", "sim", "--out", str(out))
    assert result.code == 0, result.err
    assert "nothing to run: every case is in" in result.err and "pass a new --out" in result.err
    assert out.read_bytes() == before


def test_regenerating_a_calibration_from_the_same_records_keeps_the_file(cli, tmp_path):
    cal = tmp_path / "cal.json"
    records = str(ROOT / "results/cpu/cpu-quick.jsonl")
    assert cli("calibrate", records, "--out", str(cal)).code == 0
    first = cal.read_bytes()
    second = cli("calibrate", records, "--out", str(cal))
    assert second.code == 0 and "kept" in second.out
    assert cal.read_bytes() == first


def test_the_committed_calibrations_are_what_the_readme_commands_write(cli, tmp_path, monkeypatch):
    """Each README `vramlab calibrate` line, run into a copy of its --out file, keeps it."""
    monkeypatch.chdir(ROOT)
    lines = re.findall(r"^vramlab calibrate (results/(?:[^\n]*\\\n)*[^\n]+)", README, re.MULTILINE)
    assert len(lines) == 3
    for line in lines:
        argv = line.replace("\\\n", " ").split()
        out = argv[argv.index("--out") + 1]
        copy = tmp_path / Path(out).name
        shutil.copy(ROOT / out, copy)
        argv[argv.index("--out") + 1] = str(copy)
        result = cli("calibrate", *argv)
        assert result.code == 0, result.err
        assert "kept" in result.out, f"{out} is not what `vramlab calibrate {line}` writes"


def test_a_report_from_the_same_records_is_byte_identical(cli, tmp_path):
    records = str(ROOT / "results/cpu/cpu-timeline.jsonl")
    runs = []
    for name in ("a", "b"):
        assert cli("validate", records, "--report", str(tmp_path / name), "--title", "t").code == 0
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert runs[0] == runs[1]


def test_a_campaign_stopped_by_its_budget_says_how_to_go_on(tmp_path):
    from profiler import cli as cli_module

    class Stopped:
        def __init__(self, *a, **k):
            pass

        def run(self):
            return {"started": "", "wall_s": 330.0, "backend": "sim", "workers": 2, "cases_planned": 80,
                    "cases_already_done": 0, "counts": {"ok": 16}, "not_run": 64, "stopped_by_budget": True,
                    "interrupted": False, "cases": []}

    import profiler.sweeps.campaign as campaign
    original = campaign.Campaign
    campaign.Campaign = Stopped
    try:
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_module.main(["campaign", str(ROOT / "benchmarks/gpu-standard.toml"), "--backend", "sim",
                                    "--out", str(tmp_path)])
    finally:
        campaign.Campaign = original
    assert code == 1
    assert "64 of 80 cases not run" in err.getvalue() and "the same command again" in err.getvalue()
