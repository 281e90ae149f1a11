"""The one-call campaign: isolation of cases in one process, and the scheduler's behaviour
(admission by predicted memory, OOM reruns, crashes, timeouts, resume, budget)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from estimator.modelspec import load_model
from estimator.setup import Setup
from profiler.measure import isolation, steps
from profiler.measure.isolation import PROCESS_RESIDUAL_LIMIT_BYTES, run_isolated
from profiler.measure.run import make_case
from profiler.record import read_records
from profiler.sweeps.campaign import Campaign, plan_jobs

ROOT = Path(__file__).resolve().parents[1]
FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fake_campaign_worker.py"))]

#: Real shipped models at short sequences: the point is identity across orders, which
#: does not depend on size; each case is a full warm-up + measured step.
ISOLATION_CASES = [
    ("smollm2-135m", Setup(precision="fp32", seq=64)),
    ("gpt2", Setup(mode="lora", precision="bf16", seq=64, lora_targets=("c_attn",))),
    ("opt-125m", Setup(mode="inference", precision="bf16", seq=64, new_tokens=2)),
    ("smollm2-135m", Setup(precision="amp-bf16", seq=64, grad_ckpt=True)),
]


def _peaks(record: dict) -> dict:
    """Everything measured per phase that must not depend on what ran before."""
    return {phase: (v.peak_allocated_bytes, v.start_bytes, v.end_bytes, v.categories)
            for phase, v in record.measured.phases.items()}


@pytest.mark.slow
def test_same_cases_in_two_orders_give_the_same_peaks_to_the_byte():
    seen: dict = {}
    for order in (ISOLATION_CASES, ISOLATION_CASES[::-1]):
        for model, setup in order:
            record, clean = run_isolated(model, setup, "cpu", steps=1)
            assert record.status == "ok" and clean, record.message
            assert record.isolation["leaked_storages"] == 0
            seen.setdefault((model, setup), []).append(_peaks(record))
    for (model, setup), (first, second) in seen.items():
        assert first == second, f"{model} {setup.mode} {setup.precision}: peaks depend on the order"


@pytest.mark.slow
def test_persistent_worker_measures_what_a_fresh_process_measures():
    from profiler.sweeps.sweep import Planned, run_in_subprocess
    model, setup = ISOLATION_CASES[0]
    run_isolated(*ISOLATION_CASES[1], "cpu", steps=1)  # something else ran in this process first
    here, _ = run_isolated(model, setup, "cpu", steps=1)
    spec = load_model(model)
    fresh = run_in_subprocess(Planned(model, spec, setup, 1, make_case(spec, setup, "cpu", 1)), "cpu", timeout_s=300)
    assert fresh.status == "ok", fresh.message
    assert _peaks(here) == _peaks(fresh)


@pytest.mark.slow
def test_a_leaking_case_is_marked_and_does_not_move_the_next(monkeypatch):
    model, setup = ISOLATION_CASES[0]
    alone, _ = run_isolated(model, setup, "cpu", steps=1)
    kept = []
    real_step = steps.train_step

    def leaky_step(model_, opt, ids, setup_, device, measure):
        seconds = real_step(model_, opt, ids, setup_, device, measure)
        kept.append(next(iter(opt.state.values()))["exp_avg"])  # keeps an AdamW state past the case
        return seconds

    monkeypatch.setattr(steps, "train_step", leaky_step)
    leaked, clean = run_isolated(model, setup, "cpu", steps=1)
    monkeypatch.setattr(steps, "train_step", real_step)
    assert not clean and leaked.status == "error"
    state_bytes = kept[-1].untyped_storage().nbytes()
    assert leaked.isolation["leaked_bytes"] >= state_bytes > 0
    assert leaked.message.startswith("leak:")
    after, clean_after = run_isolated(model, setup, "cpu", steps=1)
    assert clean_after and after.status == "ok"
    assert _peaks(after) == _peaks(alone)


@pytest.mark.parametrize("after, clean", [(512, True), (PROCESS_RESIDUAL_LIMIT_BYTES, True),
                                          (PROCESS_RESIDUAL_LIMIT_BYTES + 512, False)])
@pytest.mark.slow
def test_a_small_process_lifetime_allocation_keeps_the_worker_a_larger_one_replaces_it(monkeypatch, after, clean):
    # CUDA's settle reports what stays allocated; here it is driven: 0 before the case, `after` after it
    # (the first H200 campaign saw 512 B after every case, no tensor of it alive)
    model, setup = ISOLATION_CASES[0]
    readings = iter([0, after])
    monkeypatch.setattr(isolation, "settle", lambda cuda: next(readings))
    record, got_clean = run_isolated(model, setup, "cpu", steps=1)
    assert record.status == "ok" and got_clean is clean
    assert record.isolation["allocated_after_bytes"] == after
    if clean:
        assert record.isolation["residual_bytes"] == after and "process-lifetime" in record.message
    else:
        assert "residual_bytes" not in record.isolation and "worker is replaced" in record.message


# ---------------------------------------------------------------------- scheduler
def _matrix(tmp_path: Path, batches, model="smollm2-135m", seq=(64,)) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(f'steps = 1\n[[cases]]\nmodel = "{model}"\nprecision = "bf16"\nseq = {list(seq)}\n'
                    f"batch = {list(batches)}\n")
    return path


def _campaign(tmp_path, batches, monkeypatch, seq=(64,), **kw) -> tuple:
    monkeypatch.setenv("FAKE_STATE", str(tmp_path))
    records = tmp_path / "out.jsonl"
    lines: list = []
    kw.setdefault("workers", 2)
    kw.setdefault("card_bytes", 100 * 2**30)
    backend = kw.pop("backend", "cuda" if kw.get("card_bytes", 0) is None else "sim")
    c = Campaign(_matrix(tmp_path, batches, seq=seq), backend, records, worker_cmd=FAKE_WORKER, log_dir=tmp_path,
                 say=lines.append, **kw)
    return c, c.run(), records, lines


def _by_batch(records_path: Path) -> dict:
    return {r.case.setup["batch"]: r for r in read_records(records_path)}


def test_scheduler_runs_cases_side_by_side_when_they_fit(tmp_path, monkeypatch):
    _, summary, records, _ = _campaign(tmp_path, [1, 2], monkeypatch)
    got = _by_batch(records)
    assert summary["counts"] == {"ok": 2, "oom": 0, "error": 0} and summary["not_run"] == 0
    assert {r.campaign["worker"] for r in got.values()} == {0, 1}
    assert not any(r.campaign["ran_alone"] for r in got.values())
    for r in got.values():  # device-wide NVML is shared when cases overlap: only the process figure stays
        assert r.measured.nvml_peak_used_bytes is None and r.measured.nvml_peak_process_bytes == 3
        assert r.campaign["nvml_scope"] == "process"


def test_scheduler_runs_a_case_alone_when_the_card_is_too_small_for_two(tmp_path, monkeypatch):
    need = plan_jobs(_matrix(tmp_path, [1, 2]), "sim", set())[0].need_bytes
    _, summary, records, _ = _campaign(tmp_path, [1, 2], monkeypatch, card_bytes=need + need // 2)
    got = _by_batch(records)
    assert summary["counts"]["ok"] == 2
    assert all(r.campaign["ran_alone"] for r in got.values())
    first, second = sorted(got.values(), key=lambda r: r.extra["fake_times"]["start"])
    assert second.extra["fake_times"]["start"] >= first.extra["fake_times"]["end"]


def test_an_oom_beside_other_cases_is_rerun_alone(tmp_path, monkeypatch):
    _, summary, records, lines = _campaign(tmp_path, [3, 2], monkeypatch)
    got = _by_batch(records)
    assert len(read_records(records)) == 2  # the OOM beside another case was not written
    assert got[3].status == "ok" and got[3].campaign["ran_alone"] and got[3].campaign["attempts"] == 2
    assert any("runs again alone" in line for line in lines)


def test_a_crash_a_hang_and_an_unclean_case_cost_only_themselves(tmp_path, monkeypatch):
    _, summary, records, _ = _campaign(tmp_path, [4, 5, 6, 1, 2], monkeypatch, case_timeout_s=3)
    got = _by_batch(records)
    assert set(got) == {1, 2, 4, 5, 6} and summary["not_run"] == 0
    assert got[4].status == "error" and "exited with code 3" in got[4].message
    assert got[5].status == "error" and "ran past 3 s" in got[5].message
    assert got[6].status == "ok" and got[1].status == got[2].status == "ok"
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    pids = {e["key"]: e["pid"] for e in events if "key" in e}
    # the cases after a crash, a hang or an unclean case ran in fresh processes
    assert len(set(pids.values())) >= 4


def test_cuda_workers_measure_their_contexts_one_at_a_time_and_alone_cases_keep_device_nvml(tmp_path, monkeypatch):
    import profiler.sweeps.campaign as campaign
    monkeypatch.setattr(campaign, "_nvml_device_used", lambda: 4 * 2**20)  # the idle card, before any worker
    need = plan_jobs(_matrix(tmp_path, [1, 2]), "cuda", set())[0].need_bytes
    free = need + need // 2 + campaign.CARD_RESERVE_BYTES  # room for one case at a time: both run alone
    monkeypatch.setenv("FAKE_FREE_BYTES", str(free))
    _, summary, records, _ = _campaign(tmp_path, [1, 2], monkeypatch, workers=3, card_bytes=None)
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    inits = sorted(e["init"] for e in events if "init" in e)
    assert len(inits) == 2  # one worker per case, never more than the cases
    assert all(a[1] <= b[0] for a, b in zip(inits, inits[1:])), "CUDA inits overlapped"
    cases = [e["start"] for e in events if "key" in e]
    assert min(cases) >= inits[-1][1], "a case ran while a worker measured its context"
    assert summary["card_free_bytes"] == free
    got = read_records(records)
    assert len(got) == 2 and all(r.campaign["ran_alone"] for r in got)
    for r in got:
        if r.campaign["ran_alone"]:
            m = r.measured
            assert r.campaign["nvml_scope"] == "device"
            # idle = the card before any worker + the other worker's context (500 B)
            assert m.nvml_idle_used_bytes == 4 * 2**20 + 500
            assert m.categories["context"] == 8 * 2**20 - (4 * 2**20 + 500) - 2**20
        else:
            assert r.campaign["nvml_scope"] == "process" and r.measured.nvml_peak_used_bytes is None


def test_cuda_replacement_workers_start_beside_running_cases_and_tests_still_run(tmp_path, monkeypatch):
    # every batch-6 case ends unclean, so its worker is replaced; the first H200 campaign
    # replaced every worker and held each new one until no case ran (one case at a time)
    monkeypatch.setenv("FAKE_FREE_BYTES", str(100 * 2**30))
    tests = [sys.executable, "-c", "print('gpu tests')"]
    _, summary, records, _ = _campaign(tmp_path, [6, 2], monkeypatch, seq=(64, 128, 256), workers=2,
                                       card_bytes=None, tests=tests, tests_log=tmp_path / "tests.log")
    assert summary["counts"]["ok"] == 6 and summary["not_run"] == 0
    assert summary["tests"]["exit"] == 0
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    inits = [e["init"] for e in events if "init" in e]
    assert len(inits) >= 4  # 2 initial workers + a replacement per unclean case that had work after it
    spans = [r.extra["fake_times"] for r in read_records(records)]
    beside = [i for i in inits if any(s["start"] < i[0] < s["end"] for s in spans)]
    assert beside, "no replacement initialised while another case ran"


def test_resume_skips_recorded_cases_and_the_budget_keeps_what_finished(tmp_path, monkeypatch):
    c, summary, records, _ = _campaign(tmp_path, [7, 8, 9, 10], monkeypatch, workers=1, budget_s=2.5)
    assert summary["stopped_by_budget"] and 0 < len(read_records(records)) < 4
    done = len(read_records(records))
    c2 = Campaign(c.matrix, "sim", records, workers=2, card_bytes=100 * 2**30, worker_cmd=FAKE_WORKER,
                  log_dir=tmp_path, say=lambda _: None)
    summary2 = c2.run()
    assert summary2["cases_already_done"] == done and summary2["cases_planned"] == 4 - done
    assert len(read_records(records)) == 4


@pytest.mark.slow
def test_campaign_cli_runs_real_workers_on_sim(tmp_path, cli):
    matrix = tmp_path / "m.toml"
    matrix.write_text('steps = 1\n[[cases]]\nmodel = ["smollm2-135m", "gpt2"]\nprecision = "bf16"\nseq = 32\n')
    r = cli("campaign", str(matrix), "--backend", "sim", "--out", str(tmp_path / "out"), "--workers", "2")
    assert r.code == 0, r.err
    records = read_records(tmp_path / "out" / "sim-m.jsonl")
    assert sorted(x.case.model for x in records) == ["gpt2", "smollm2-135m"]
    assert all(x.backend == "sim" and x.status == "ok" for x in records)
    summary = json.loads((tmp_path / "out" / "campaign.json").read_text())
    assert summary["counts"]["ok"] == 2 and len(summary["cases"]) == 2
    assert "| model / mode | cases | total s |" in r.out
    # the worker's record is the one an in-process run gives, to the byte
    alone, _ = run_isolated("gpt2", Setup(precision="bf16", seq=32), "sim", steps=1)
    (worker_gpt2,) = [x for x in records if x.case.model == "gpt2"]
    assert _peaks(worker_gpt2) == _peaks(alone)


def test_campaign_rejects_bad_numbers(tmp_path, cli):
    matrix = _matrix(tmp_path, [1])
    r = cli("campaign", str(matrix), "--backend", "sim", "--out", str(tmp_path), "--budget-s", "-1")
    assert r.code == 2 and "positive" in r.err
    r = cli("campaign", str(matrix), "--backend", "sim", "--out", str(tmp_path), "--workers", "0")
    assert r.code == 2 and "positive integer" in r.err


@pytest.mark.gpu
def test_cuda_cases_in_two_orders_give_the_same_allocator_peaks():
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cases = [("smollm2-135m", Setup(precision="bf16", seq=256, batch=2)),
             ("gpt2", Setup(precision="fp32", seq=256)),
             ("opt-125m", Setup(mode="inference", precision="bf16", seq=256, new_tokens=4))]
    seen: dict = {}
    for order in (cases, cases[::-1]):
        for model, setup in order:
            record, clean = run_isolated(model, setup, "cuda", steps=1)
            assert record.status == "ok" and clean, (record.message, record.isolation)
            assert record.isolation["allocated_after_bytes"] <= PROCESS_RESIDUAL_LIMIT_BYTES
            seen.setdefault((model, setup), []).append(
                {p: v.peak_allocated_bytes for p, v in record.measured.phases.items()})
    for key, (first, second) in seen.items():
        assert first == second, key
