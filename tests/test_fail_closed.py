"""Fail closed, everywhere (issue 26): every path a user hands us is a regular file of a
bounded size, outputs that replace a file never destroy it, the compare gate fails on a
missing measurement, children never import the user's current directory, interrupted
ranks die with their parent, the Trainer callback survives Adafactor and exceptions, and
bad input exits 2 with one sentence."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import estimator.files
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "cpu" / "cpu-quick.jsonl"
CALIBRATION = ROOT / "results" / "calibration" / "cpu-quick.json"
#: Seconds a refused special file may take: it is refused before it is opened for reading,
#: so anything near this bound is a read that blocked (a FIFO with no writer).
REFUSE_WITHIN_S = 20


class Hung(BaseException):
    """A command still running at its deadline (a BaseException: the CLI's handlers let it through)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise Hung(f"still running after {seconds} s: a read blocked")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _matrix(tmp_path: Path, body: str = 'model = "gpt2"\nprecision = "bf16"\nseq = 32\n') -> Path:
    path = tmp_path / "m.toml"
    path.write_text("steps = 1\n[[cases]]\n" + body)
    return path


# ------------------------------------------------------------------ 3. one guard for every path
@pytest.fixture(params=["fifo", "character device", "directory"])
def special(request, tmp_path) -> tuple[str, Path]:
    """A path that is not a regular file, and the word the refusal names it by."""
    if request.param == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        return "FIFO", path
    if request.param == "character device":
        return "character device", Path(os.devnull)
    path = tmp_path / "folder"
    path.mkdir()
    return "directory", path


def _readers(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Every command that reads a user's file, with ``path`` in the file's place."""
    out = str(tmp_path / "out")
    return {
        "calibrate records": ["calibrate", str(path), "--out", out + ".json"],
        "validate records": ["validate", str(path)],
        "compare baseline": ["compare", str(path), str(RECORDS)],
        "compare current": ["compare", str(RECORDS), str(path)],
        "--calibration": ["estimate", "gpt2", "--calibration", str(path)],
        "validate --calibration": ["validate", str(RECORDS), "--calibration", str(path)],
        "matrix": ["sweep", str(path), "--backend", "sim", "--out", out + ".jsonl"],
        "campaign matrix": ["campaign", str(path), "--backend", "sim", "--out", out],
        "sweep --out on resume": ["sweep", str(_matrix(tmp_path)), "--backend", "sim", "--out", str(path)],
        "validate --published": ["validate", "--published", str(path)],
    }


@pytest.mark.parametrize("reader", ["calibrate records", "validate records", "compare baseline", "compare current",
                                    "--calibration", "validate --calibration", "matrix", "campaign matrix",
                                    "sweep --out on resume", "validate --published"])
def test_every_reader_refuses_what_is_not_a_regular_file(cli, special, reader, tmp_path):
    kind, path = special
    with deadline(REFUSE_WITHIN_S):
        r = cli(*_readers(path, tmp_path)[reader])
    assert r.code == 2, (r.code, r.err)
    assert f"{path} is a {kind}, not a regular file" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err


def test_the_pytest_plugin_refuses_special_files(special):
    from profiler.integrations.pytest_plugin import load_baseline
    kind, path = special
    with deadline(REFUSE_WITHIN_S), pytest.raises(ValueError, match=f"{path} is a {kind}, not a regular file"):
        load_baseline(path)


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(estimator.files, "MAX_INPUT_BYTES", 2**20)
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as fh:
        fh.truncate(2**20 + 1)  # sparse: one byte over the cap, no disk used
    r = cli("validate", str(big))
    assert r.code == 2 and f"{big} holds {2**20 + 1} bytes, more than the 1.00 MiB" in r.err, r.err
    with pytest.raises(ValueError, match="more than the 1.00 MiB"):
        read_records(big)
    at_cap = tmp_path / "at-cap.jsonl"
    at_cap.write_bytes(RECORDS.read_bytes())
    assert read_records(at_cap)  # under the cap: read as always


def test_appending_to_a_special_file_is_refused(tmp_path):
    from profiler.record import append_record, lock_records
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (record,) = read_records(RECORDS)[:1]
    with deadline(REFUSE_WITHIN_S):
        with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
            append_record(fifo, record)
        with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
            with lock_records(fifo):
                pass


# ------------------------------------------------------------------ 7. an output never destroys the file it replaces
def _limited(nbytes: int):
    """preexec_fn: files this process writes stop at ``nbytes`` (RLIMIT_FSIZE: the write fails
    with EFBIG, as a full disk fails it with ENOSPC; Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def test_calibrate_out_on_a_full_disk_keeps_the_previous_file(tmp_path):
    previous = tmp_path / "cal.json"
    previous.write_text(CALIBRATION.read_text())
    before = previous.read_bytes()
    r = subprocess.run([sys.executable, "-m", "profiler.cli", "calibrate", str(RECORDS), "--out", str(previous)],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300,
                       preexec_fn=_limited(len(before) // 4))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"cannot write calibration {previous}" in r.stderr and "Traceback" not in r.stderr
    assert previous.read_bytes() == before  # the old calibration, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json"]  # no temporary file left beside it


def test_write_atomic_replaces_whole_files_only(tmp_path):
    from estimator.files import write_atomic
    target = tmp_path / "a.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    write_atomic(target, "new\n", "report")
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640
    write_atomic(tmp_path / "b.bin", b"\x00\x01", "plot")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="is a FIFO, not a regular file"):
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        write_atomic(fifo, "x", "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "pipe"]


def test_calibrate_out_naming_a_device_or_fifo_is_refused_before_the_old_file_is_read(tmp_path, capsys):
    """The second sweep's find: ``calibrate --out /dev/full`` read the "previous calibration"
    from /dev/full (zeros without end) before its write was refused, until the kernel killed it."""
    from profiler.cli import main
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out, word in ((Path("/dev/full") if Path("/dev/full").exists() else Path(os.devnull), "character device"),
                      (fifo, "FIFO")):
        with deadline(REFUSE_WITHIN_S):
            assert main(["calibrate", str(RECORDS), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"calibration {out} is a {word}, not a regular file" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["validate", str(RECORDS), "--report", "{file}"], ["loop", "--out", "{file}"],
                                  ["campaign", str(ROOT / "benchmarks" / "gpu-standard.toml"), "--backend", "sim",
                                   "--out", "{file}"]], ids=["validate --report", "loop --out", "campaign --out"])
def test_an_output_folder_that_is_a_file_is_one_sentence(tmp_path, capsys, argv):
    from profiler.cli import main
    file = tmp_path / "taken"
    file.write_text("data a user keeps\n")
    assert main([a.replace("{file}", str(file)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{file} exists and is not a folder; name a folder" in err and "Errno" not in err
    assert file.read_text() == "data a user keeps\n"


# ------------------------------------------------------------------ 4. children never import the user's directory
TINY_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
              "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def _booby_trapped(folder: Path) -> Path:
    """A folder whose ``json.py`` and ``estimator/`` leave a marker file when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "IMPORTED"
    trap = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (folder / "json.py").write_text(trap)
    (folder / "estimator").mkdir(exist_ok=True)
    (folder / "estimator" / "__init__.py").write_text(trap)
    return marker


def _vramlab(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """The CLI as its console script runs it: the checkout importable, the current directory not."""
    return subprocess.run([sys.executable, "-P", "-m", "profiler.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sweep", "campaign"])
def test_workers_never_import_code_from_the_current_directory(tmp_path, command):
    user = tmp_path / "user"
    marker = _booby_trapped(user)
    model = tmp_path / "tiny-llama.json"
    model.write_text(json.dumps(TINY_LLAMA))
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'steps = 1\nprecision = "fp32"\n[[cases]]\nmodel = "{model}"\nseq = 8\n')
    out = tmp_path / "out"
    extra = ["--out", str(out) + ".jsonl"] if command == "sweep" else ["--out", str(out), "--workers", "1"]
    r = _vramlab(command, str(matrix), "--backend", "sim", *extra, cwd=user, timeout=600)
    assert not marker.exists(), f"a worker imported {marker.read_text().split()} from the current directory"
    assert r.returncode == 0, r.stderr
    records = read_records(str(out) + ".jsonl" if command == "sweep" else out / "sim-m.jsonl")
    assert [x.status.value for x in records] == ["ok"], [x.message for x in records]


# ------------------------------------------------------------------ 7. exit codes: bad input is 2, with one sentence
HUGE = "9" * 400 + "GiB"  # a float of infinity: no integer number of bytes


def _one_sentence(r, code: int = 2):
    assert r.code == code, (r.code, r.out, r.err)
    assert len(r.err.strip().splitlines()) == 1 and "internal error" not in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("argv", [["fit", "gpt2", "--memory", HUGE],
                                  ["campaign", "MATRIX", "--backend", "sim", "--out", "OUT", "--card-memory", HUGE]],
                         ids=["fit --memory", "campaign --card-memory"])
def test_sizes_too_large_to_hold_exit_2(cli, tmp_path, argv):
    argv = [str(_matrix(tmp_path)) if a == "MATRIX" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    r = cli(*argv)
    _one_sentence(r)
    assert "too large" in r.err


def test_parse_bytes_says_a_size_is_too_large():
    from estimator.units import parse_bytes
    with pytest.raises(ValueError, match="too large to be a number of bytes"):
        parse_bytes(HUGE)


def _deep_line(depth: int) -> str:
    return "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize("command", ["validate", "calibrate", "compare"])
def test_a_records_line_nested_100000_deep_exits_2(cli, tmp_path, command):
    deep = tmp_path / "deep.jsonl"
    deep.write_text(RECORDS.read_text() + _deep_line(100_000))
    args = {"validate": [str(deep)], "calibrate": [str(deep), "--out", str(tmp_path / "c.json")],
            "compare": [str(RECORDS), str(deep)]}[command]
    r = cli(command, *args)
    _one_sentence(r)
    line = len(RECORDS.read_text().splitlines()) + 1  # the deep line after the committed records
    assert f"{deep}, line {line}" in r.err and "deeper than" in r.err


def test_documents_nested_too_deep_exit_2(cli, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": 1, "x": ' + _deep_line(100_000).strip() + "}")
    r = cli("estimate", "gpt2", "--calibration", str(deep))
    _one_sentence(r)
    assert "deeper than" in r.err


def test_validate_published_given_a_records_file_exits_2(cli):
    r = cli("validate", "--published", str(RECORDS))
    _one_sentence(r)
    assert f"{RECORDS} line 1 is not a published measurement" in r.err and "vramlab validate FILE" in r.err


def _closed_reader(args: list[str]) -> subprocess.CompletedProcess:
    """``vramlab ARGS | head -0``: the reader of stdout is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "profiler.cli", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=_env(), timeout=300)
    finally:
        os.close(write)


@pytest.mark.parametrize("argv", [["rules"], ["estimate", "gpt2"], ["fit", "gpt2", "--memory", "24GiB"],
                                  ["validate", str(RECORDS)]], ids=lambda a: a[0])
def test_a_closed_pipe_ends_tables_and_json_alike_and_quietly(argv):
    table, as_json = _closed_reader(argv), _closed_reader(argv + ["--json"])
    assert (table.returncode, table.stderr) == (as_json.returncode, as_json.stderr) == (0, "")


def test_a_closed_pipe_keeps_the_gate_verdict(tmp_path):
    objs = [json.loads(line) for line in RECORDS.read_text().splitlines()]
    for o in objs:
        o["measured"]["peak_allocated_bytes"] *= 2
    grown = tmp_path / "grown.jsonl"
    grown.write_text("".join(json.dumps(o) + "\n" for o in objs))
    assert _closed_reader(["compare", str(RECORDS), str(grown)]).returncode == 1  # a regression, read or not


@pytest.mark.parametrize("argv", [["rules"], ["rules", "--json"], ["estimate", "gpt2"]], ids=" ".join)
def test_a_closed_stdout_exits_2_with_a_sentence(argv):
    r = subprocess.run([sys.executable, "-m", "profiler.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, cwd=ROOT, env=_env(), timeout=300, preexec_fn=lambda: os.close(1))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["vramlab: error: standard output is closed; redirect it to a file or "
                                             "/dev/null (> FILE)"]


@pytest.mark.parametrize("body,message", [
    ('model = "gpt2"\nnew_tokens = 4\n', "--new-tokens 4 applies to --mode inference"),
    ('model = "gpt2"\nattn = "flash"\ndevice = "cpu"\n', "--attn flash (FlashAttention-2) runs on CUDA only"),
    ('model = "gpt2"\nattn = "flash"\nprecision = "fp32"\n', "--attn flash needs 16-bit attention inputs"),
], ids=["new_tokens with training", "flash on cpu", "flash in fp32"])
@pytest.mark.parametrize("command", ["sweep", "campaign"])
def test_matrix_cases_get_the_cli_contradiction_checks(cli, tmp_path, body, message, command):
    out = tmp_path / ("out.jsonl" if command == "sweep" else "out")
    r = cli(command, str(_matrix(tmp_path, body)), "--backend", "sim", "--out", str(out))
    _one_sentence(r)
    assert "case 1 (gpt2)" in r.err and message in r.err
    written = [out] if out.is_file() else list(out.rglob("*.jsonl")) if out.is_dir() else []
    assert all(p.stat().st_size == 0 for p in written)  # no case ran


def test_flash_cases_on_the_cpu_backend_are_refused_too(cli, tmp_path):
    r = cli("sweep", str(_matrix(tmp_path, 'model = "gpt2"\nattn = "flash"\n')), "--backend", "cpu",
            "--out", str(tmp_path / "o.jsonl"))
    _one_sentence(r)
    assert "runs on CUDA only" in r.err


def test_a_matrix_over_the_case_cap_is_refused_at_once_unless_raised(cli, tmp_path):
    from profiler.sweeps.matrix import MAX_CASES
    # 10 ** 6 cases: six lists of ten
    big = _matrix(tmp_path, 'model = "gpt2"\n' + "".join(f"{k} = {list(range(1, 11))}\n" for k in
                                                          ("batch", "seq", "lora_rank", "grad_accum", "world_size")) +
                  'lora_alpha = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n')
    with deadline(REFUSE_WITHIN_S):
        r = cli("sweep", str(big), "--backend", "sim", "--out", str(tmp_path / "o.jsonl"))
    _one_sentence(r)
    assert f"expands to 1000000 cases, more than the cap of {MAX_CASES}" in r.err and "--max-cases" in r.err
    two = _matrix(tmp_path, 'model = "gpt2"\nseq = [8, 16]\nprecision = "bf16"\n')
    r = cli("sweep", str(two), "--backend", "sim", "--out", str(tmp_path / "o.jsonl"), "--max-cases", "1")
    _one_sentence(r)
    assert "expands to 2 cases, more than the cap of 1" in r.err
    r = cli("campaign", str(two), "--backend", "sim", "--out", str(tmp_path / "c"), "--max-cases", "0")
    _one_sentence(r)
    assert "--max-cases must be a positive integer" in r.err


@pytest.mark.parametrize("flag", ["--budget-s", "--case-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_campaign_rejects_nan_and_infinite_seconds(cli, tmp_path, flag, value):
    r = cli("campaign", str(_matrix(tmp_path)), "--backend", "sim", "--out", str(tmp_path / "out"), f"{flag}={value}")
    _one_sentence(r)
    assert "finite positive number of seconds" in r.err and value in r.err
    from profiler.sweeps.campaign import Campaign
    with pytest.raises(ValueError, match="finite positive number of seconds"):
        Campaign(_matrix(tmp_path), "sim", tmp_path / "r.jsonl",
                 **{{"--budget-s": "budget_s", "--case-timeout": "case_timeout_s"}[flag]: float(value)})


# ------------------------------------------------------------------ 2. interrupted ranks die with their parent
#: Seconds for two ranks to start under torchrun on 2 busy cores (imports of torch, rendezvous).
RANKS_START_S = 180
#: Seconds every child may take to go once vramlab is stopped: torchrun's ranks are told
#: at once; the launcher gives torchrun STOP_GRACE_S (10 s) before it kills it.
CHILDREN_GONE_S = 45


def _children(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose command line holds ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found[int(entry.name)] = cmdline
    return found


def _wait_for(predicate, seconds: float, poll_s: float = 0.2):
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return predicate()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_profile_nproc_leaves_no_rank_and_no_temporary_folder(tmp_path, sig):
    model = tmp_path / f"tiny-llama-{sig.name}.json"  # in every child's command line (the request)
    model.write_text(json.dumps(TINY_LLAMA))
    user = tmp_path / "user"
    imported = _booby_trapped(user)
    temp = tmp_path / "tmp"
    temp.mkdir()
    log = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen([sys.executable, "-P", "-m", "profiler.cli", "profile", str(model), "--nproc", "2",
                             "--backend", "cpu", "--sharding", "ddp", "--precision", "fp32", "--seq", "32",
                             "--steps", "100000"], cwd=user, env=dict(_env(), TMPDIR=str(temp)),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        ranks = _wait_for(lambda: [p for p, c in _children(str(model)).items() if "dist_worker" in c
                                   and "torch.distributed.run" not in c and "profiler.measure.launch" not in c
                                   and p != proc.pid] if len(_children(str(model))) >= 4 else [], RANKS_START_S)
        assert len(ranks) == 2, (tmp_path / "stderr.log").read_text()[-2000:]
        assert list(temp.glob("vramlab-dist-*")), "the launch's temporary folder was not made in TMPDIR"
        if sig is signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the foreground process group
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=CHILDREN_GONE_S)
        assert code == (-signal.SIGKILL if sig is signal.SIGKILL else 130), (tmp_path / "stderr.log").read_text()
        left = _wait_for(lambda: not _children(str(model)), CHILDREN_GONE_S) or _children(str(model))
        assert left is True, f"still running after {CHILDREN_GONE_S} s: {left}"
        assert not list(temp.glob("vramlab-dist-*")), list(temp.iterdir())
        assert not imported.exists(), "a rank imported code from the current directory"
    finally:
        for pid in [proc.pid, *_children(str(model))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.mark.slow
def test_ctrl_c_during_a_campaign_exits_130(tmp_path):
    matrix = _matrix(tmp_path, 'model = "gpt2"\nprecision = "bf16"\nseq = [32, 64, 96, 128]\n')
    err = tmp_path / "stderr.log"
    with open(err, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "profiler.cli", "campaign", str(matrix), "--backend", "sim",
                                 "--out", str(tmp_path / "out"), "--workers", "1"], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        assert _wait_for(lambda: "cases to run" in err.read_text(), RANKS_START_S), err.read_text()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=CHILDREN_GONE_S) == 130, err.read_text()
        assert "every finished case is on disk" in err.read_text()
        assert json.loads((tmp_path / "out" / "campaign.json").read_text())["interrupted"] is True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
