"""Shared fixtures: run the ``vramlab`` CLI in-process and capture what it prints."""
from __future__ import annotations

from typing import NamedTuple

import pytest


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli("estimate", "llama-2-7b", "--json")`` -> CliResult(code, stdout, stderr)."""
    from profiler.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()  # drop anything printed before this call
        code = main(list(argv))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def agrees_per_phase():
    """``agrees_per_phase(record, 0.01)``: today's estimate of a committed record's case is
    within the tolerance of every phase it measured (zero_grad aside), tensors only."""
    from estimator.categories import TENSOR_CATEGORIES, Phase
    from estimator.estimate import estimate
    from estimator.modelspec import load_model
    from estimator.setup import Setup
    tensors = {c.value for c in TENSOR_CATEGORIES}

    def check(record, tolerance: float) -> None:
        assert record.ok, record.message
        est = estimate(load_model(record.case.model), Setup.from_dict(record.case.setup))
        for phase, m in record.measured.phases.items():
            if phase == Phase.ZERO_GRAD.value:
                continue
            pred = sum(v for k, v in est.phases[phase].items() if str(k) in tensors)
            got = m.peak_allocated_bytes
            assert abs(pred - got) <= tolerance * got, (phase, pred, got, (pred - got) / got)

    return check


@pytest.fixture
def predicted_agrees_per_phase():
    """``predicted_agrees_per_phase(record, 0.01)``: a fresh record's own prediction (run_case with a
    ModelSpec of its own, which the registry cannot load again) is within the tolerance of every
    phase it measured (zero_grad aside), tensors only."""
    from estimator.categories import TENSOR_CATEGORIES, Phase
    tensors = {c.value for c in TENSOR_CATEGORIES}

    def check(record, tolerance: float) -> None:
        assert record.ok and record.predicted is not None, record.message
        for phase, m in record.measured.phases.items():
            if phase == Phase.ZERO_GRAD.value:
                continue
            pred = sum(v for k, v in record.predicted.phases[phase].items() if k in tensors)
            got = m.peak_allocated_bytes
            assert abs(pred - got) <= tolerance * got, (phase, pred, got, (pred - got) / got)

    return check


@pytest.fixture
def bad_config_is_one_sentence(cli, tmp_path):
    """``bad_config_is_one_sentence(config, message)``: reading ``config`` raises a ConfigError matching
    ``message``, and ``vramlab estimate`` on it as a config.json exits 2 with one line on stderr."""
    import json

    from estimator.configcheck import ConfigError
    from estimator.modelspec import spec_from_config

    def check(config: dict, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            spec_from_config(config, name="bad-config")
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        out = cli("estimate", str(path))
        assert out.code == 2 and out.err.count("\n") == 1, out.err

    return check


@pytest.fixture
def shipped_is_the_meta_build():
    """``shipped_is_the_meta_build(name, total)``: a shipped config's parameter count is exact, equal
    to ``total`` and to transformers' meta build, group by group."""
    from estimator.modelspec import load_model
    from estimator.params import count_params, meta_count

    def check(name: str, total: int) -> None:
        spec = load_model(name)
        count, meta = count_params(spec), meta_count(spec)
        assert spec.has_formula and count.exact
        assert count.total == total == meta.total
        assert count.groups == meta.groups

    return check


@pytest.fixture
def inference_agrees_with_the_sim(predicted_agrees_per_phase):
    """``inference_agrees_with_the_sim(spec, cache_slack, tolerance)``: prefill (b2 x s1024) and 2
    decoded tokens on the CUDA sim; the cache is keys and values at kv heads x head_dim
    (kv_cache_bytes), the decode's measured cache term (a layer's concatenation beside it) is the
    estimate's within ``cache_slack`` bytes, and every phase is within ``tolerance``."""
    from estimator.estimate import kv_cache_bytes
    from estimator.setup import Setup
    from profiler.measure.run import run_case

    def check(spec, cache_slack: int, tolerance: float) -> None:
        setup = Setup(mode="inference", precision="bf16", batch=2, seq=1024, new_tokens=2)
        record = run_case(spec.name, setup, "sim", steps=1, spec=spec)
        cache = spec.num_layers * setup.batch * (setup.seq + setup.new_tokens) * 2 * spec.kv_dim * 2
        measured = record.measured.phases["decode"].categories["kv_cache"]
        assert cache < measured and abs(record.predicted.phases["decode"]["kv_cache"] - measured) <= cache_slack
        assert kv_cache_bytes(spec, setup, setup.seq + setup.new_tokens) == cache
        predicted_agrees_per_phase(record, tolerance)

    return check
