"""The README's QLoRA table: measured cpu records beside the estimate of an earlier commit and
today's, worst phase per setup over the records' architectures. Prints markdown rows (one per
setup) and, with --detail, one line per record and phase.

    python benchmarks/qlora_table.py results/cpu-qlora/qlora-cpu.jsonl results/cpu-qlora/8bit-cpu.jsonl \\
        --before c4f26a1

A phase's error is (estimate's tensor bytes) / (measured peak) - 1, as benchmarks/qlora_check.py
takes it; the step peak's is the largest phase estimate over the record's peak. Each cell is the
largest error by magnitude over the setup's records, with the architecture (and phase) it is in.

The earlier estimate is the estimator of ``--before`` as that commit has it (``git archive`` into
a temporary directory, imported by a subprocess without site-packages or the working tree on its
path: the estimator is pure Python), on the same model config and setup under the record's
library versions. A setup field that commit did not know (``kbit_prep``) is dropped, so it
estimates the run as it could; a setup it refused (``--quant fp4``, ``paged-adamw-8bit``) is
shown as refused. Bad input (no records, an unknown commit): one sentence, exit 2.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from estimator.categories import TENSOR_CATEGORIES
from estimator.estimate import estimate
from profiler.analysis.validate import _spec, current_setup
from profiler.record import read_records

ROOT = Path(__file__).resolve().parents[1]
T = {c.value for c in TENSOR_CATEGORIES}

#: run by the earlier commit's estimator: one JSON job per stdin line -> one JSON answer per line
_BEFORE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import estimator
assert list(estimator.__path__) == [sys.argv[1] + "/estimator"], estimator.__path__  # that commit's only
from dataclasses import fields
from estimator.estimate import estimate
from estimator.modelspec import load_model
from estimator.setup import Setup
from estimator.categories import TENSOR_CATEGORIES
T = {c.value for c in TENSOR_CATEGORIES}
known = {f.name for f in fields(Setup)}
for line in sys.stdin:
    job = json.loads(line)
    try:
        setup = Setup.from_dict({k: v for k, v in job["setup"].items() if k in known})
        est = estimate(load_model(job["model"]), setup)
        out = {ph: sum(v for k, v in cats.items() if k in T)
               for ph, cats in est.to_dict()["phases"].items()}
    except ValueError as e:
        out = {"refused": str(e).split(";")[0][:80]}
    print(json.dumps(out), flush=True)
"""


def setup_name(s: dict) -> str:
    """The table's row: what differs between the records of one architecture."""
    name = f"{s['mode']} {s['quant']}" if s["mode"] == "qlora" else f"{s['mode']} bf16"
    if s.get("kbit_prep"):
        name += f", kbit-prep {s['kbit_prep']}"
    if s.get("grad_ckpt"):
        name += ", grad-ckpt"
    if s.get("optimizer", "adamw") != "adamw":
        name += f", {s['optimizer']}"
    if s.get("attn", "sdpa") != "sdpa":  # benchmarks/long-cpu.toml's rows
        name += f", {s['attn']}"
    if s.get("seq", 512) != 512:
        name += f", s{s['seq']}"
    return name


def arch(model: str) -> str:
    return Path(model).name.removesuffix(".json")


def now_phases(record) -> dict[str, int]:
    est = estimate(_spec(record.case.model), current_setup(record)).to_dict()
    return {ph: sum(v for k, v in cats.items() if k in T) for ph, cats in est["phases"].items()}


def before_phases(records, rev: str) -> list[dict]:
    """Each record's estimate by commit ``rev``'s estimator (see the module docstring)."""
    tar = subprocess.run(["git", "archive", rev, "estimator"], cwd=ROOT, check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        tarfile.open(fileobj=io.BytesIO(tar)).extractall(tmp, filter="data")
        jobs = "".join(json.dumps({"model": r.case.model, "setup": current_setup(r).to_dict()}) + "\n"
                       for r in records)
        out = subprocess.run([sys.executable, "-I", "-S", "-c", _BEFORE, tmp], input=jobs, text=True, cwd=ROOT,
                             check=True, capture_output=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def worst(errs: list[tuple[float, str]]) -> str:
    if not errs:
        return "-"
    err, where = max(errs, key=lambda e: abs(e[0]))
    return f"{err * 100:+.2f} % ({where})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--before", required=True, help="the commit whose estimator is 'before'")
    ap.add_argument("--detail", action="store_true", help="one line per record and phase too")
    a = ap.parse_args(argv)
    try:
        records = [r for path in a.records for r in read_records(path) if r.ok]
    except (OSError, ValueError) as e:
        print(f"qlora_table: {e}", file=sys.stderr)
        return 2
    if not records:
        print("qlora_table: no ok records in " + ", ".join(map(str, a.records)), file=sys.stderr)
        return 2
    try:
        before = before_phases(records, a.before)
    except subprocess.CalledProcessError as e:
        print(f"qlora_table: the estimator of {a.before} did not run: {(e.stderr or b'')[-300:]!r}", file=sys.stderr)
        return 2
    rows: dict[str, dict[str, list]] = defaultdict(lambda: {"before": [], "now": [], "before_peak": [], "now_peak": [],
                                                         "refused": set(), "archs": []})
    for r, old in zip(records, before):
        row = rows[setup_name(r.case.setup)]
        row["archs"].append(arch(r.case.model))
        new = now_phases(r)
        peak, where = r.measured.peak_allocated_bytes, arch(r.case.model)
        row["now_peak"].append((max(new.values()) / peak - 1, where))
        if "refused" not in old:
            row["before_peak"].append((max(old.values()) / peak - 1, where))
        for ph, m in r.measured.phases.items():
            if ph not in new:
                continue
            where = f"{arch(r.case.model)} {ph}"
            row["now"].append((new[ph] / m.peak_allocated_bytes - 1, where))
            if "refused" in old:
                row["refused"].add(old["refused"])
            elif ph in old:
                row["before"].append((old[ph] / m.peak_allocated_bytes - 1, where))
            if a.detail:
                b = "refused" if "refused" in old else f"{old[ph] / m.peak_allocated_bytes - 1:+.4%}"
                print(f"{setup_name(r.case.setup):40s} {where:28s} measured {m.peak_allocated_bytes:>12,} "
                      f"before {b:>9s} now {new[ph] / m.peak_allocated_bytes - 1:+.4%}")
    print("| setup | records | before: step peak | before: worst phase | now: step peak | now: worst phase |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        refused = "refused: " + "; ".join(sorted(row["refused"]))
        b_peak, b = (worst(row["before_peak"]), worst(row["before"])) if row["before"] else (refused, refused)
        print(f"| {name} | {len(row['archs'])} | {b_peak} | {b} | {worst(row['now_peak'])} | {worst(row['now'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
