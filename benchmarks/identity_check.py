"""Refactoring check: every shipped model (and a few config variants that exercise switches
the shipped ones do not) times a fixed grid of setups, estimated and written as JSON lines,
then compared with a saved run byte for byte.

    python benchmarks/identity_check.py --save /tmp/identity-before.jsonl.gz
    ... refactor ...
    python benchmarks/identity_check.py --check /tmp/identity-before.jsonl.gz

Each line is one (model, setup) pair: ``Estimate.to_dict()`` (every phase, every category,
the first step, the notes) or, for a setup the model refuses, the error's sentence. The grid
is drawn from a fixed seed over every setup field an estimate reads (mode, precision,
quantization, optimizer and its implementation, batch, sequence, checkpointing, attention,
LoRA rank and targets, device, sharding and world size, new tokens, loop, accumulation,
kept gradients, KV cache, loss, library versions, compute capability), so the same command
draws the same grid on every machine. Prints a table and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from estimator.estimate import estimate  # noqa: E402
from estimator.modelspec import ModelSpec, load_model, registry_names, spec_from_config  # noqa: E402
from estimator.setup import Setup  # noqa: E402

SEED = 20261201
SETUPS = 1200

#: setup fields and the values the grid draws from (a value of None leaves the default)
AXES = {
    "mode": ["full", "full", "lora", "lora", "qlora", "inference", "eval"],
    "precision": ["fp32", "bf16", "bf16", "fp16", "amp-bf16", "amp-fp16", "mixed-bf16"],
    "quant": ["nf4", "nf4-dq", "int8"],  # used by qlora / inference only
    "optimizer": ["adamw", "adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor", "none"],
    "optimizer_impl": ["auto", "auto", "foreach", "for-loop", "fused"],
    "batch": [1, 1, 2, 3, 8],
    "seq": [16, 128, 512, 1024, 2048],
    "grad_ckpt": [False, False, True],
    "attn": ["sdpa", "sdpa", "eager", "flash"],
    "lora_rank": [8, 16, 64],
    "lora_targets": ["default", "default", "all-linear", "attention"],
    "device": ["cuda", "cuda", "cpu"],
    "sharding": [("none", 1), ("none", 1), ("ddp", 2), ("zero1", 4), ("zero2", 2), ("zero3", 8),
                 ("fsdp", 2), ("fsdp", 64), ("fsdp1", 2), ("fsdp1", 4), ("fsdp1-shard-grad-op", 2)],
    "new_tokens": [0, 0, 1, 64],
    "loop": ["trainer", "trainer", "manual", "held"],
    "grad_accum": [1, 1, 1, 2],
    "keep_grads": [False, False, True],
    "use_cache": [False, False, True],
    "loss": ["causal-lm", "causal-lm", "logits-sum"],
    "versions": ["", "", "", "transformers=4.42.4", "transformers=4.46.0", "transformers=4.48.3",
                 "transformers=4.44.2", "transformers=4.55.0,torch=2.4", "torch=1.13", "transformers=4.50.0"],
    "compute_capability": ["", "", "", "7.5", "9.0"],
}

#: config variants beside the shipped files: switches no shipped config takes
VARIANTS = {
    "variant-neox-serial": ("pythia-70m", {"use_parallel_residual": False}),
    "variant-llama-biases": ("smollm2-135m", {"attention_bias": True, "mlp_bias": True, "num_hidden_layers": 4}),
    "variant-opt-postln": ("opt-125m", {"do_layer_norm_before": False}),
    "variant-gpt2-gelu": ("gpt2", {"activation_function": "gelu", "n_layer": 3}),
    "variant-gpt2-relu": ("gpt2", {"activation_function": "relu", "n_layer": 3}),
    "variant-qwen2-tied": ("qwen2.5-0.5b", {"tie_word_embeddings": True, "num_hidden_layers": 3}),
    "variant-gemma2-nosoftcap": ("gemma-2-2b", {"final_logit_softcapping": None, "num_hidden_layers": 3}),
}


def _targets(spec: ModelSpec, choice: str) -> str | None:
    from estimator.params import default_lora_targets, layer_linears
    if choice == "default":
        return ",".join(default_lora_targets(spec))
    if choice == "all-linear":
        return "all-linear"
    names = [lin.name for lin in layer_linears(spec) if lin.group == "attention" and not lin.fused_experts]
    return ",".join(dict.fromkeys(names))


def draw_setups(seed: int = SEED, n: int = SETUPS) -> list[dict]:
    """``n`` setups as plain dicts (lora_targets still a choice name), the same for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        d = {k: rng.choice(v) for k, v in AXES.items()}
        sharding, world = d.pop("sharding")
        d["sharding"], d["world_size"] = sharding, world
        if d["mode"] not in ("qlora", "inference") or (d["mode"] == "inference" and rng.random() < 0.6):
            d["quant"] = "none"
        if d["optimizer"] in ("none", "adamw-8bit"):
            d["optimizer_impl"] = "auto"
        if d["mode"] in ("inference", "eval"):
            d["sharding"], d["world_size"] = "none", 1
        else:
            d["new_tokens"] = 0
        out.append(d)
    return out


def models() -> list[tuple[str, ModelSpec]]:
    out = [(name, load_model(name)) for name in registry_names()]
    for name, (base, changes) in VARIANTS.items():
        cfg = dict(load_model(base).config)
        cfg.update(changes)
        cfg = {k: v for k, v in cfg.items() if v is not None}
        out.append((name, spec_from_config(cfg, name=name, source=f"variant:{name}")))
    return out


def run() -> list[dict]:
    lines = []
    grid = draw_setups()
    for name, spec in models():
        for i, raw in enumerate(grid):
            d = dict(raw)
            line = {"model": name, "setup": i}
            try:
                d["lora_targets"] = _targets(spec, d["lora_targets"])
                if spec.max_positions:  # GPT-2 and BioGPT stop at 1024 positions
                    d["seq"] = min(d["seq"], spec.max_positions - d["new_tokens"])
                line["estimate"] = estimate(spec, Setup(**d)).to_dict()
            except ValueError as exc:
                line["error"] = str(exc)
            lines.append(line)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write the run here (.jsonl.gz)")
    g.add_argument("--check", help="compare the run with this saved one")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    lines = run()
    seconds = time.perf_counter() - t0
    ok = sum("estimate" in x for x in lines)
    print(f"| models | setups | estimates | refused | seconds |\n|---|---|---|---|---|\n"
          f"| {len({x['model'] for x in lines})} | {SETUPS} | {ok} | {len(lines) - ok} | {seconds:.1f} |")
    if args.save:
        with gzip.open(args.save, "wt") as fh:
            for line in lines:
                fh.write(json.dumps(line, sort_keys=True) + "\n")
        print(f"saved {len(lines)} lines to {args.save}")
        return 0
    with gzip.open(args.check, "rt") as fh:
        before = [json.loads(x) for x in fh]
    now = {(x["model"], x["setup"]): x for x in lines}
    missing = [(x["model"], x["setup"]) for x in before if (x["model"], x["setup"]) not in now]
    if missing:
        gone = sorted({m for m, _ in missing})
        print(f"DIFFERENT: {len(missing)} saved lines have no counterpart now (models {gone})")
        return 1
    added = sorted({x["model"] for x in lines} - {x["model"] for x in before})
    if added:
        print(f"models not in the saved run (not compared): {', '.join(added)}")
    diffs = [(a, now[(a["model"], a["setup"])]) for a in before
             if a != json.loads(json.dumps(now[(a["model"], a["setup"])], sort_keys=True))]
    lines = [now[(a["model"], a["setup"])] for a in before]
    if diffs:
        print(f"DIFFERENT: {len(diffs)} of {len(lines)} lines differ; the first 5:")
        for a, b in diffs[:5]:
            ea, eb = a.get("estimate") or {}, b.get("estimate") or {}
            where = [k for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)]
            print(f"  {a['model']} setup {a['setup']}: {a.get('error') or ''} -> {b.get('error') or ''} "
                  f"fields {where[:6]} allocated {ea.get('allocated_bytes')} -> {eb.get('allocated_bytes')}")
        return 1
    ok = sum("estimate" in x for x in lines)
    print(f"identical: {len(lines)} lines ({ok} estimates, {len(lines) - ok} refusals) byte for byte")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
