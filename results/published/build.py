#!/usr/bin/env python3
"""Build results/published/records.jsonl: one record per published GPU measurement.

Input: the transcription in ``source/`` (``transcribe.py`` turns the verbatim tables in
``source/raw/`` and the hand-typed small tables into rows; provenance in
``source/NOTES.md``, the model configs in ``source/configs/``). Every value was read in the
cited source; nothing here is estimated or fitted. This script only (1) normalises units to
bytes, (2) names the registry model and the vramlab Setup of the rows whose configuration is
fully known ("pinned"), and (3) adds the gaps that follow from pinning: the transformers
version each benchmark ran under, inferred from its pull request (not printed by the source),
and why a row is left out.

Run: ``python results/published/build.py`` (from the repository root or anywhere).
"""
from __future__ import annotations

import json
import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "source"

UNITS = {"MB": 10**6, "MB (as printed)": 10**6, "GB": 10**9, "GiB": 2**30, "bytes": 1}
METRICS = ("max_memory_allocated", "max_memory_reserved", "nvidia-smi")

#: The transformers model_doc SDPA training tables: model, registry name, GPU architecture
#: (NVIDIA's compute-capability table: RTX 3080 Ti 8.6 Ampere, L40S 8.9 Ada, RTX 2060 7.5 Turing) and the
#: transformers version the table ran under, inferred from the pull request that added the
#: table together with the model's SDPA class: the class first ships in that release
#: (read in the wheels: GPT2SdpaAttention is in 4.42.4 models/gpt2/modeling_gpt2.py:563;
#: OPTSdpaAttention is absent from 4.45.2 and in 4.46.0 models/opt/modeling_opt.py:374).
TRAINING_TABLES = {
    "openai-community/gpt2-large": dict(
        registry="gpt2-large", architecture="ampere", compute_capability="8.6", transformers="4.42",
        evidence="PR #31172 (vasqu, benchmarks posted 2024-06-01) added GPT2SdpaAttention and this table; "
                 "first release with the class: 4.42.0 (2024-06-27); the run used a 4.42.0.dev0 tree"),
    "EleutherAI/pythia-410m-deduped": dict(
        registry="pythia-410m-deduped", architecture="ampere", compute_capability="8.6", transformers="4.42",
        evidence="PR #31031 (vasqu, table in the PR description 2024-05-25) added GPTNeoXSdpaAttention and this "
                 "table; the class is absent from 4.41.2 and present in 4.42.4 "
                 "(models/gpt_neox/modeling_gpt_neox.py:500), and vasqu wrote on 2024-06-27 (EleutherAI/sparsify#1) "
                 "that it 'has been added now in v4.42.0', so the run used a 4.42.0.dev0 tree"),
    "microsoft/biogpt": dict(
        registry="biogpt", architecture="turing", compute_capability="7.5", transformers="4.45",
        evidence="the table was added with BioGptSdpaAttention, which is absent from 4.44.2 and present in 4.45.2 "
                 "(models/biogpt/modeling_biogpt.py:249; the pull request was not found in the index), so the run "
                 "used a 4.45.0.dev0 tree; 4.45.2 and 4.46.0 run the same BioGPT attention and loss code"),
    "facebook/opt-350m": dict(
        registry="opt-350m", architecture="ada", compute_capability="8.9", transformers="4.46",
        evidence="PR #33298 (SDPA for OPT, Sept 2024) added OPTSdpaAttention and this table; the class is "
                 "absent from 4.45.2 and present in 4.46.0, so the run used a 4.46.0.dev0 tree"),
}

TRAINING_MODE = "forward-backward-no-optimizer"


def _registry_models() -> set[str]:
    return {p.stem for p in (HERE.parents[1] / "estimator" / "data" / "models").glob("*.json")}


def _stale_sdpa(rows: list[dict]) -> set[int]:
    """Rows whose SDPA value repeats, to every printed digit, the value of the row above it in
    the same table where that row has fewer tokens: the table's other SDPA values grow with
    batch x seq, so a repeat at twice the tokens is a stale number (the benchmark prints the
    SDPA column beside an eager OOM), not a measurement of that configuration."""
    stale = set()
    last: dict[tuple, tuple[int, float]] = {}
    for i, r in enumerate(rows):
        if r["mode"] != TRAINING_MODE or r["attention"] != "sdpa" or r["value"] is None:
            continue
        key = (r["model"], r["batch"])
        prev = last.get(key)
        if prev and prev[1] == r["value"] and prev[0] < r["seq"]:
            stale.add(i)
        last[key] = (r["seq"], r["value"])
    return stale


def build(rows: list[dict]) -> list[dict]:
    registry = _registry_models()
    stale = _stale_sdpa(rows)
    out = []
    for i, r in enumerate(rows):
        rec = {k: r.get(k) for k in ("source", "gpu", "versions", "model", "architecture", "mode", "precision",
                                     "optimizer", "batch", "seq", "new_tokens", "padding", "attention", "lora",
                                     "quantization", "sharding")}
        rec["id"] = f"row-{i:03d}"
        rec["checkpointing"] = r.get("grad_ckpt")
        unit = r.get("unit")
        value = r.get("value")
        rec["metric"] = {"name": r.get("metric"), "value": value, "unit": unit, "unit_note": r.get("unit_note"),
                         "bytes": int(round(value * UNITS[unit])) if value is not None and unit in UNITS else None,
                         "evidence": r.get("metric_evidence")}
        if r.get("value_range"):
            rec["metric"]["value_range"] = r["value_range"]
        gaps = list(r.get("gaps") or [])
        table = TRAINING_TABLES.get(r.get("model"))
        reasons = []
        if table and r.get("mode") == TRAINING_MODE:
            versions = dict(rec["versions"] or {})
            versions["transformers"] = table["transformers"]
            rec["versions"] = versions
            gaps.append(f"transformers version inferred, not printed: {table['transformers']} ({table['evidence']})")
            gaps.append("the model config's use_cache=True: the forward returns its key/value cache, held with the "
                        "outputs (legacy tuple caches in this transformers)")
            rec["registry_model"] = table["registry"]
            rec["gpu_architecture"] = {"architecture": table["architecture"],
                                       "compute_capability": table["compute_capability"]}
            if value is None:
                reasons.append("printed OOM: no number")
            if i in stale:
                reasons.append("the SDPA value repeats the row above (fewer tokens) to every digit beside an eager "
                               "OOM: a stale number, not this configuration's")
            rec["setup"] = {"mode": "full", "precision": "fp16", "optimizer": "none", "loss": "logits-sum",
                            "loop": "held", "use_cache": True, "batch": r["batch"], "seq": r["seq"],
                            "attn": r["attention"], "device": "cuda",
                            # the GPU decides the sdpa kernel: no flash attention before 8.0 (the
                            # RTX 2060's sdpa runs the memory-efficient kernel)
                            "compute_capability": table["compute_capability"],
                            "versions": [["torch", versions["torch"]], ["transformers", table["transformers"]]]}
        else:
            if r.get("metric") not in METRICS:
                reasons.append(f"metric {r.get('metric')!r} is not max_memory_allocated, reserved or nvidia-smi")
            name = (r.get("model") or "").split("/")[-1].lower()
            if name not in registry:
                reasons.append(f"model {r.get('model')!r} is not in the registry")
            if not reasons and r.get("model") == "microsoft/biogpt" and str(r.get("mode", "")).startswith("inference"):
                reasons.append("BioGptModel forward ('a simple AutoModel head'): no LM head, the last hidden state and "
                               "the key/value cache returned, under a mask that pads each batch's first token; vramlab "
                               "models causal-LM heads (prefill with logits) only, and the release is not pinned")
            if not reasons and str(r.get("mode", "")).startswith("inference-generate"):
                reasons.append("generate: the number of new tokens is not printed (the script's default is "
                               "100) and the mask pads each batch's first token")
            if not reasons:
                reasons.append("workload not fully pinned: " + "; ".join(gaps[:3]))
        rec["gaps"] = gaps
        rec["pinned"] = not reasons
        rec["excluded_because"] = reasons
        out.append(rec)
    return out


def transcribed_rows() -> list[dict]:
    """The rows ``source/transcribe.py`` builds from the verbatim tables (no file written)."""
    return runpy.run_path(str(SOURCE / "transcribe.py"), run_name="transcribe")["rows"]


def main() -> None:
    records = build(transcribed_rows())
    with open(HERE / "records.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    pinned = sum(r["pinned"] for r in records)
    print(f"wrote {HERE / 'records.jsonl'}: {len(records)} rows, {pinned} pinned")


if __name__ == "__main__":
    main()
