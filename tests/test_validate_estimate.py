"""``validate --estimate current|recorded``: today's estimator under each record's library
versions, or the estimate frozen in the record."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from estimator.estimate import estimate
from estimator.modelspec import load_model
from profiler.analysis.validate import current_setup, with_estimates
from profiler.record import read_records

QUICK = Path(__file__).resolve().parents[1] / "results" / "cpu" / "cpu-quick.jsonl"


def _records():
    return [r for r in read_records(QUICK) if r.ok][:4]


def test_current_re_estimates_under_the_records_versions():
    records = _records()
    frozen = [replace(r, predicted=replace(r.predicted, allocated_bytes=1)) for r in records]
    current, redone, moved = with_estimates(frozen, "current")
    assert redone == len(records) and moved == len(records)  # every tampered estimate replaced
    for r, c in zip(records, current):
        setup = current_setup(r)
        assert dict(setup.versions)["transformers"] == r.versions["transformers"]
        assert c.predicted.allocated_bytes == estimate(load_model(r.case.model), setup).allocated_bytes


def test_recorded_keeps_the_frozen_estimate():
    frozen = [replace(r, predicted=replace(r.predicted, allocated_bytes=1)) for r in _records()]
    kept, redone, moved = with_estimates(frozen, "recorded")
    assert [r.predicted.allocated_bytes for r in kept] == [1] * len(frozen) and (redone, moved) == (0, 0)


def test_unknown_choice_is_a_sentence():
    with pytest.raises(ValueError, match="--estimate must be one of: current, recorded"):
        with_estimates([], "latest")


def test_cli_says_which_estimate_it_validated(cli):
    import json
    out = cli("validate", str(QUICK))
    assert out.code == 0 and "estimate: current" in out.out
    data = json.loads(cli("validate", str(QUICK), "--json", "--estimate", "recorded").out)
    assert data["estimate"] == {"which": "recorded", "re_estimated": 0, "differing": 0}
