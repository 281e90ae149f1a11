"""The real SFTTrainer's CPU steps beside two estimates, per phase (issue 24's table).

before: the nearest setup vramlab had (the HF Trainer, the causal-LM loss, checkpointing);
after: ``--trainer sft --loss chunked-nll`` (TRL's fused LM head). Reads the committed records
(``results/trl/sft-cpu.jsonl``, real runs) and prints a markdown table; a model the records name
by a path that is gone is looked up beside them (``results/trl/<file name>``).

    python benchmarks/trl_before_after.py [RECORDS.jsonl]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.categories import TENSOR_CATEGORIES, Category  # noqa: E402
from estimator.estimate import estimate  # noqa: E402
from estimator.modelspec import load_model  # noqa: E402
from estimator.setup import Setup  # noqa: E402
from profiler.record import read_records  # noqa: E402

MiB = 2**20


def _tensors(phase: dict) -> int:
    return sum(v for k, v in phase.items() if Category(k) in TENSOR_CATEGORIES)


def rows(path: Path) -> list[dict]:
    """One row per record and phase (and the step's peak): measured, before, after (bytes)."""
    out = []
    for r in read_records(path):
        model = r.case.model
        if model.endswith(".json") and not Path(model).exists():
            model = str(path.parent / Path(model).name)
        spec = load_model(model)
        after = Setup.from_dict(r.case.setup)
        before = after.replace(trainer="hf", loss="causal-lm")
        eb, ea = estimate(spec, before), estimate(spec, after)
        for phase in ("forward", "backward", "optimizer"):
            got = r.measured.phases[phase].peak_allocated_bytes
            b = _tensors({c.value: v for c, v in next(v for p, v in eb.phases.items() if p.value == phase).items()})
            a = _tensors({c.value: v for c, v in next(v for p, v in ea.phases.items() if p.value == phase).items()})
            out.append(dict(model=Path(model).stem, mode=after.mode.value, phase=phase, measured=got,
                            before=b, after=a))
        out.append(dict(model=Path(model).stem, mode=after.mode.value, phase="peak",
                        measured=r.measured.peak_allocated_bytes, before=eb.allocated_bytes, after=ea.allocated_bytes))
    return out


def table(data: list[dict]) -> str:
    lines = ["| model | mode | phase | measured SFTTrainer (MiB) | before: HF Trainer + causal-lm + ckpt | "
             "after: --trainer sft (chunked-nll) |", "|---|---|---|---|---|---|"]
    def cell(x: int, got: int) -> str:
        return f"{x / MiB:,.1f} ({100 * (x - got) / got:+.2f} %)"

    for row in data:
        got = row["measured"]
        lines.append(f"| {row['model']} | {row['mode']} | {row['phase']} | {got / MiB:,.1f} | "
                     f"{cell(row['before'], got)} | {cell(row['after'], got)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results" / "trl" / "sft-cpu.jsonl")))
