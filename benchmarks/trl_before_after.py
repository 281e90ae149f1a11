"""The real SFTTrainer's and DPOTrainer's CPU steps beside two estimates, per phase (issue 24's table).

before: the nearest setup vramlab had (the HF Trainer, the causal-LM loss, checkpointing; for DPO
at twice the batch, chosen and rejected, with no reference); after: ``--trainer sft --loss
chunked-nll`` (TRL's fused LM head), or ``--trainer dpo --ref-model ...`` (the reference's copy
and forward, estimator/dpo.py). Reads the committed records (``results/trl/sft-cpu.jsonl``,
``results/trl/dpo-cpu.jsonl``, real runs) and prints a markdown table per file; a model the
records name by a path that is gone is looked up beside them (``results/trl/<file name>``).

    python benchmarks/trl_before_after.py [RECORDS.jsonl ...]
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
        dpo = after.ref_model is not None
        before = after.replace(trainer="hf", loss="causal-lm", ref_model=None,
                               batch=after.batch * (2 if dpo else 1))
        eb, ea = estimate(spec, before), estimate(spec, after)
        label = f"{after.mode.value}, ref {after.ref_model.value}" if dpo else after.mode.value
        for phase in ("forward", "reference", "backward", "optimizer"):
            if phase not in r.measured.phases:
                continue
            got = r.measured.phases[phase].peak_allocated_bytes
            b = {p.value: _tensors({c.value: v for c, v in comp.items()}) for p, comp in eb.phases.items()}.get(phase)
            a = {p.value: _tensors({c.value: v for c, v in comp.items()}) for p, comp in ea.phases.items()}[phase]
            out.append(dict(model=Path(model).stem, mode=label, phase=phase, measured=got, before=b, after=a))
        out.append(dict(model=Path(model).stem, mode=label, phase="peak",
                        measured=r.measured.peak_allocated_bytes, before=eb.allocated_bytes, after=ea.allocated_bytes))
    return out


def table(data: list[dict], trainer: str = "sft") -> str:
    """The markdown table of :func:`rows` for the records of ``trainer`` (sft or dpo)."""
    head = {"sft": ("SFTTrainer", "HF Trainer + causal-lm + ckpt", "--trainer sft (chunked-nll)"),
            "dpo": ("DPOTrainer", "HF Trainer + causal-lm + ckpt at 2 x batch", "--trainer dpo")}[trainer]
    lines = [f"| model | mode | phase | measured {head[0]} (MiB) | before: {head[1]} | after: {head[2]} |",
             "|---|---|---|---|---|---|"]

    def cell(x: int | None, got: int) -> str:
        return "no such phase" if x is None else f"{x / MiB:,.1f} ({100 * (x - got) / got:+.2f} %)"

    for row in data:
        got = row["measured"]
        lines.append(f"| {row['model']} | {row['mode']} | {row['phase']} | {got / MiB:,.1f} | "
                     f"{cell(row['before'], got)} | {cell(row['after'], got)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or [ROOT / "results" / "trl" / f"{t}-cpu.jsonl" for t in ("sft", "dpo")]
    print("\n\n".join(table(rows(p), "dpo" if "dpo" in p.name else "sft") for p in paths if p.exists()))
