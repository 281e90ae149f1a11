"""Records are never lost (issue 15, item 5): resume keeps a whole last record, readers
skip only a torn tail, one writer per file, killed workers run again on request and
never outlive the sweep, a closed pipe does not stop it. One test per case; exit codes
through the CLI. Numbers in records: tests/test_record_numbers.py."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profiler.record import RecordError, Status, append_record, lock_records, new_record, read_records
from profiler.sweeps.sweep import WorkerKilled, plan, sweep

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "results" / "cpu" / "cpu-quick.jsonl"
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
#: Seconds to wait for a sweep's worker to appear or go away (a worker imports torch: ~3 s).
PROCESS_WAIT_S = 60
#: Seconds a worker may take to die after its sweep was killed (the kernel signals it at once).
WORKER_DEATH_S = 3


@pytest.fixture()
def matrix(tmp_path) -> Path:
    """A two-case matrix of a tiny model: 'seq' 8 and 16, one sim step each."""
    config = tmp_path / "tiny-llama.json"
    config.write_text(json.dumps(TINY_LLAMA))
    m = tmp_path / "m.toml"
    m.write_text(f'steps = 1\nprecision = "fp32"\n[[cases]]\nmodel = "{config}"\nseq = [8, 16]\n')
    return m


@pytest.fixture()
def one_case(tmp_path, matrix) -> Path:
    m = tmp_path / "one.toml"
    m.write_text(matrix.read_text().replace("seq = [8, 16]", "seq = 8"))
    return m


def _recorded(matrix: Path, out: Path) -> str:
    """Every case of the matrix recorded (as errors: nothing runs), as the file's text."""
    for job in plan(matrix, "sim"):
        append_record(out, new_record(job.case, Status.ERROR, "written by the test"))
    return out.read_text()


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "profiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=_env(), **kw)


def _sweep_proc(matrix, out, *extra, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "profiler.cli", "sweep", str(matrix), "--backend", "sim",
                             "--out", str(out), *extra], cwd=ROOT, env=_env(), **kw)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _wait_for_worker(pid: int) -> int:
    deadline = time.monotonic() + PROCESS_WAIT_S
    while time.monotonic() < deadline:
        kids = _children(pid)
        if kids:
            return kids[0]
        time.sleep(0.02)
    raise AssertionError("the sweep started no worker")


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


# ------------------------------------------------------------------ resume and torn tails
def test_a_whole_last_record_without_newline_is_kept_on_resume(matrix, tmp_path):
    out = tmp_path / "out.jsonl"
    text = _recorded(matrix, out)
    out.write_text(text.rstrip("\n"))  # the newline never reached the disk
    r = _cli("sweep", matrix, "--backend", "sim", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "2 already in" in r.stderr and "running 0" in r.stderr  # not deleted, not measured again
    assert out.read_text() == text  # the newline appended, nothing else changed


def test_a_torn_last_record_is_cut_on_resume_with_a_warning_naming_the_line(matrix, tmp_path):
    out = tmp_path / "out.jsonl"
    text = _recorded(matrix, out)
    out.write_text(text + text.splitlines()[0][:100])  # a third record cut short
    r = _cli("sweep", matrix, "--backend", "sim", "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{out}, line 3: removed an unfinished last record (100 bytes" in r.stderr and "running 0" in r.stderr
    assert out.read_text() == text


def _with_torn_tail(tmp_path) -> tuple[Path, int]:
    text = QUICK.read_text()
    path = tmp_path / "torn.jsonl"
    path.write_text(text + text.splitlines()[0][:500])
    return path, text.count("\n")


@pytest.mark.parametrize("command", ["validate", "calibrate", "compare"])
def test_readers_skip_a_torn_tail_with_a_warning_and_keep_every_whole_record(tmp_path, command):
    torn, whole = _with_torn_tail(tmp_path)
    args = {"validate": ("validate", torn, "--json"),
            "calibrate": ("calibrate", torn, "--out", tmp_path / "cal.json"),
            "compare": ("compare", QUICK, torn)}[command]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{torn}, line {whole + 1}: skipped an unfinished last record (500 bytes" in r.stderr
    if command == "validate":
        assert json.loads(r.stdout)["cases"] == whole
    elif command == "calibrate":
        assert json.loads((tmp_path / "cal.json").read_text())["cases_used"] == whole
    else:
        assert f"{whole} cases matched" in r.stdout and "no regression" in r.stdout


def test_read_records_skips_only_a_torn_tail(tmp_path):
    torn, whole = _with_torn_tail(tmp_path)
    warnings = []
    assert len(read_records(torn, allow_partial_tail=True, warn=warnings.append)) == whole
    assert warnings == [f"{torn}, line {whole + 1}: skipped an unfinished last record (500 bytes, "
                        f"a write cut short)"]
    with pytest.raises(RecordError, match=f"line {whole + 1}: an unfinished last record"):
        read_records(torn)
    no_newline = tmp_path / "whole.jsonl"
    no_newline.write_text(QUICK.read_text().rstrip("\n"))
    assert len(read_records(no_newline)) == whole  # a whole record is a record, newline or not
    middle = tmp_path / "middle.jsonl"
    lines = QUICK.read_text().splitlines()
    middle.write_text("\n".join([lines[0], lines[1][:300]] + lines[2:]) + "\n")
    with pytest.raises(RecordError, match="line 2: not valid JSON"):  # only a tail is forgiven
        read_records(middle, allow_partial_tail=True)


# ------------------------------------------------------------------ one writer per file
def test_a_second_sweep_on_the_same_file_exits_2(matrix, tmp_path):
    out = tmp_path / "out.jsonl"
    text = _recorded(matrix, out)
    with open(out, "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running sweep holds it
        r = _cli("sweep", matrix, "--backend", "sim", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{out} is being written by another vramlab sweep or campaign" in r.stderr
    assert out.read_text() == text
    with lock_records(out):
        with pytest.raises(RecordError, match="being written by another"):
            sweep(matrix, "sim", out)
    assert _cli("sweep", matrix, "--backend", "sim", "--out", out).returncode == 0  # released


# ------------------------------------------------------------------ killed workers
def _fake_runner(outcomes: list[str]):
    """A runner that replays ``outcomes`` ('killed', 'ok', 'oom', 'error') and counts calls."""
    calls = []

    def runner(job, backend, timeout_s, timeline):
        calls.append(job.key)
        what = outcomes[len(calls) - 1]
        if what == "killed":
            raise WorkerKilled(new_record(job.case, Status.ERROR, "worker was killed by SIGKILL"), "SIGKILL")
        return new_record(job.case, Status(what), "" if what == "ok" else f"the case: {what}")
    return runner, calls


def test_retries_rerun_a_killed_worker_only(one_case, tmp_path):
    runner, calls = _fake_runner(["killed", "ok"])
    warnings = []
    (record,) = sweep(one_case, "sim", tmp_path / "a.jsonl", runner=runner, retries=2, warn=warnings.append)
    assert record.ok and len(calls) == 2 and "ran again after its worker was killed (SIGKILL)" in record.message
    assert "running it again (retry 1 of 2)" in warnings[0]
    runner, calls = _fake_runner(["killed", "killed"])
    (record,) = sweep(one_case, "sim", tmp_path / "b.jsonl", runner=runner, retries=1)
    assert record.status is Status.ERROR and len(calls) == 2 and "killed on all 2 runs" in record.message
    runner, calls = _fake_runner(["killed"])
    (record,) = sweep(one_case, "sim", tmp_path / "c.jsonl", runner=runner)  # retries default to 0
    assert record.message == "worker was killed by SIGKILL" and len(calls) == 1
    for outcome in ("oom", "error"):  # out of memory is a data point; a failing case fails again
        runner, calls = _fake_runner([outcome, "ok"])
        (record,) = sweep(one_case, "sim", tmp_path / f"{outcome}.jsonl", runner=runner, retries=3)
        assert record.status.value == outcome and len(calls) == 1
    with pytest.raises(ValueError, match="retries must be a non-negative integer"):
        sweep(one_case, "sim", tmp_path / "d.jsonl", retries=-1)


@pytest.mark.slow
def test_cli_retries_rerun_a_case_whose_worker_was_killed(one_case, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _sweep_proc(one_case, out, "--retries", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.kill(_wait_for_worker(proc.pid), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "worker killed by SIGKILL; running it again (retry 1 of 1)" in stderr
    (record,) = read_records(out)
    assert record.ok and "ran again after its worker was killed (SIGKILL)" in record.message
    assert "1 ok, 0 oom, 0 error" in stdout
    assert _cli("sweep", one_case, "--retries", "-1", "--out", out).returncode == 2


def test_the_worker_dies_with_the_sweep(tmp_path):
    slow = tmp_path / "slow.toml"  # ~11 s in a worker: far longer than a dying worker takes
    slow.write_text('steps = 3\n[[cases]]\nmodel = "smollm2-135m"\nseq = 512\nbatch = 4\n')
    out = tmp_path / "out.jsonl"
    proc = _sweep_proc(slow, out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = _wait_for_worker(proc.pid)
    proc.kill()  # the sweep alone: SIGKILL, no handler runs, its process group is left alone
    proc.wait()
    deadline = time.monotonic() + WORKER_DEATH_S
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"the worker outlived the sweep by {WORKER_DEATH_S} s")
    assert not out.exists() or out.read_text() == ""


@pytest.mark.slow
def test_a_closed_stdout_pipe_does_not_stop_the_sweep(matrix, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = _sweep_proc(matrix, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc.stdout.close()  # `vramlab sweep ... 2>&1 | head -0`: the reader is gone before the first line
    assert proc.wait(timeout=300) == 0
    records = read_records(out)
    assert len(records) == 2 and all(r.ok for r in records)


# ------------------------------------------------------------------ options and numbers
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "0", "-1", "soon"])
@pytest.mark.slow
def test_case_timeout_must_be_finite_and_positive(matrix, tmp_path, value):
    out = tmp_path / "out.jsonl"
    r = _cli("sweep", matrix, "--backend", "sim", "--out", out, f"--case-timeout={value}")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--case-timeout" in r.stderr
    assert not out.exists()


def test_case_timeout_checked_in_the_api(matrix, tmp_path):
    for bad in (float("inf"), float("nan"), 0):
        with pytest.raises(ValueError, match="finite positive number of seconds"):
            sweep(matrix, "sim", tmp_path / "out.jsonl", timeout_s=bad)


def test_a_case_whose_extra_is_missing_is_skipped_without_a_record_and_runs_on_resume(tmp_path, monkeypatch):
    """Without trl a --trainer case is skipped (no record, one sentence naming the extra); the
    other cases run; once trl is importable a resumed sweep runs the skipped case."""
    import importlib.util

    from profiler.measure import build
    config = tmp_path / "tiny-llama.json"
    config.write_text(json.dumps(TINY_LLAMA))
    m = tmp_path / "m.toml"
    m.write_text(f'steps = 1\nprecision = "fp32"\nseq = 16\n[[cases]]\nmodel = "{config}"\nmode = "full"\n'
                 f'[[cases]]\nmodel = "{config}"\nmode = "lora"\nlora_targets = [["q_proj"]]\ntrainer = "sft"\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    out, skipped = tmp_path / "r.jsonl", []
    runner, calls = _fake_runner(["ok", "ok"])
    records = sweep(m, "cpu", out, runner=runner, on_skip=lambda n, total, job, why: skipped.append((n, total, why)))
    assert len(records) == len(calls) == 1 and "trainer" not in records[0].case.setup
    assert skipped == [(2, 2, "--trainer sft needs trl, which is not installed (pip install -e '.[trl]')")]
    assert len(read_records(out)) == 1
    monkeypatch.setattr(build.importlib.util, "find_spec", real)
    (record,) = sweep(m, "cpu", out, runner=runner)
    assert record.case.setup.get("trainer") == "sft" and len(read_records(out)) == 2 and len(calls) == 2


def test_missing_extra_names_the_package_and_the_extra(monkeypatch):
    import importlib.util

    from estimator.setup import Setup
    from profiler.measure import build
    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "trl", "datasets") else real(name, *a))
    assert build.missing_extra(Setup(mode="qlora", quant="nf4")) == \
        "--quant nf4 needs bitsandbytes, which is not installed (pip install -e '.[quant]')"
    assert "--optimizer adamw-8bit needs bitsandbytes" in build.missing_extra(Setup(optimizer="adamw-8bit"))
    dpo = Setup(trainer="dpo", loss="chunked-nll")
    assert "--trainer dpo needs trl and datasets, which are not installed" in build.missing_extra(dpo)
    assert build.missing_extra(Setup()) is None
    monkeypatch.setattr(build.importlib.util, "find_spec", real)
    # installed here (the test extra)
    assert build.missing_extra(Setup(mode="qlora", quant="nf4", trainer="sft")) is None
