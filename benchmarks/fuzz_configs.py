"""Fuzz: random config.json files through the ``vramlab`` CLI, one table of outcomes.

Each case writes a fresh random config file (a shipped config with a few fields changed
to values of the wrong type, out of range or inconsistent; a synthetic config of a family
with a formula; an unknown or formula-less model_type; keys that can load code or kernels;
or a file that is not a JSON object at all: non-UTF-8 bytes, deep nesting, NaN, 1e400, ...)
and runs ``vramlab estimate FILE --json`` or ``vramlab fit FILE --memory 24GiB --json``
with random setup flags, in-process (``profiler.cli.main``). An outcome is

- ``exit-0``: exit code 0 and a JSON answer whose bytes are non-negative integers with
  ``total_bytes >= weights``;
- ``exit-2``: exit code 2 with exactly one line on stderr, ``vramlab: error: ...``;
- ``other``: anything else (an exception out of ``main``, another exit code, a traceback,
  more than one line, a nonsense answer, a case over ``--timeout``), listed after the table.

    python benchmarks/fuzz_configs.py                  # 1000 cases, a fresh seed
    python benchmarks/fuzz_configs.py --n 200 --seed 7 # reproducible

Exits 1 when any case is ``other``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from estimator.modelspec import MODELS_DIR  # noqa: E402
from profiler.cli import main  # noqa: E402

#: seconds one case may take before it counts as a hang (a meta-device build of an
#: unknown model type imports transformers, a few seconds the first time)
CASE_TIMEOUT_S = 60.0
#: fields that memory depends on, in every family's vocabulary (modelspec.spec_from_config)
SIZE_KEYS = ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
             "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim", "vocab_size",
             "max_position_embeddings", "n_positions", "num_local_experts", "num_experts_per_tok",
             "word_embed_proj_dim")
OTHER_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "hidden_act",
              "activation_function", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "attention_dropout",
              "final_logit_softcapping", "model_type", "do_layer_norm_before")
#: keys that make transformers load code or kernels
CODE_KEYS = {"attn_implementation": "kernels-community/flash-attn", "_attn_implementation": "flash_attention_3",
             "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"},
             "trust_remote_code": True, "custom_pipelines": {"x": {"impl": "evil.P"}},
             "experts_implementation": "kernels-community/moe"}
MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3",  # formulas
               "gpt_neox", "qwen3", "gemma3_text", "gemma4_text", "olmo2", "olmo3", "granite", "smollm3", "ministral",
               "gpt_bigcode", "qwen3_moe", "gpt_oss", "glm4_moe",
               "deepseek_v3", "bert", "t5", "falcon",  # transformers, no formula: refused
               "nosuch", "", "LLAMA", "llama ")


def _weird_value(rng: random.Random):
    """A value of a wrong type, out of range, or merely unusual."""
    pool = [0, -1, 1, 2, 3, 7, 64, 3.5, 12.0, -0.0, "12", "", "abc", True, False, None, [], [8], {}, {"a": 1},
            10**9, 10**12, 2**63, 10**30, float("nan"), float("inf"), -float("inf"), rng.randint(-10, 10**6),
            rng.random() * 100]
    return rng.choice(pool)


def _synthetic(rng: random.Random) -> dict:
    """A config of a family with a formula, sizes drawn wide (some inconsistent)."""
    family = rng.choice(("gpt2", "opt", "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "qwen3",
                         "gemma3_text", "gemma4_text", "olmo2", "olmo3", "granite", "smollm3", "ministral", "qwen3_moe",
                         "gpt_oss"))
    heads = rng.choice((1, 2, 3, 4, 7, 8, 12, 16, 32))
    hidden = heads * rng.choice((8, 16, 32, 64, 128)) if rng.random() < 0.8 else rng.randint(1, 8192)
    layers = rng.choice((1, 2, 4, 12, 32, 80, rng.randint(1, 2000)))
    vocab = rng.choice((2, 100, 32000, 50257, 256000, rng.randint(1, 10**7)))
    if family == "gpt2":
        return {"model_type": "gpt2", "n_embd": hidden, "n_head": heads, "n_layer": layers, "vocab_size": vocab,
                "n_positions": rng.choice((16, 1024, 2048))}
    if family == "opt":
        return {"model_type": "opt", "hidden_size": hidden, "num_attention_heads": heads,
                "num_hidden_layers": layers, "ffn_dim": 4 * hidden, "vocab_size": vocab,
                "max_position_embeddings": rng.choice((16, 2048))}
    cfg = {"model_type": family, "hidden_size": hidden, "num_attention_heads": heads,
           "num_key_value_heads": rng.choice((1, heads, max(heads // 2, 1), heads + 1)),
           "num_hidden_layers": layers, "intermediate_size": rng.choice((hidden * 2, hidden * 4 + 1, 11008)),
           "vocab_size": vocab, "max_position_embeddings": rng.choice((16, 4096, 131072))}
    if rng.random() < 0.3:
        cfg["head_dim"] = rng.choice((16, 64, 128, 256))
    if family == "mixtral" or rng.random() < 0.1:
        cfg["num_local_experts"] = rng.choice((0, 1, 2, 8, 64, 10**6))
        cfg["num_experts_per_tok"] = rng.choice((0, 1, 2, 9))
    if family == "qwen3_moe":
        cfg.update(num_experts=rng.choice((1, 8, 128, 10**6)), num_experts_per_tok=rng.choice((0, 1, 8, 9)),
                   moe_intermediate_size=rng.choice((64, 768, 0)))
    if family == "gpt_oss":
        cfg.update(num_local_experts=rng.choice((1, 8, 32, 128, 10**6)), num_experts_per_tok=rng.choice((0, 1, 4, 9)))
        if rng.random() < 0.3:
            cfg["quantization_config"] = rng.choice(({"quant_method": "mxfp4"}, "mxfp4", None))
        if rng.random() < 0.2:
            cfg["output_router_logits"] = rng.choice((True, "yes"))
    if family in ("gemma3_text", "gemma4_text", "olmo3", "ministral", "gpt_oss") and rng.random() < 0.5:
        cfg["sliding_window"] = rng.choice((1, 512, 4096, -5, None))
        if rng.random() < 0.5:
            cfg["layer_types"] = rng.choice((["sliding_attention"] * max(1, min(layers, 4)), "bad", [1, 2]))
    return cfg


def _deep(depth: int) -> str:
    return '{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}"


def random_case(rng: random.Random, shipped: list[dict]) -> tuple[str, bytes, list[str]]:
    """(kind, file bytes, CLI argv after the file name)."""
    roll = rng.random()
    cfg = json.loads(json.dumps(rng.choice(shipped)))
    kind = "mutated"
    if roll < 0.40:
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(SIZE_KEYS + OTHER_KEYS) if rng.random() < 0.85 else rng.choice(list(cfg))
            if rng.random() < 0.15:
                cfg.pop(key, None)
            else:
                cfg[key] = _weird_value(rng)
    elif roll < 0.60:
        kind, cfg = "synthetic", _synthetic(rng)
    elif roll < 0.70:
        kind = "model_type"
        cfg["model_type"] = rng.choice(MODEL_TYPES)
    elif roll < 0.80:
        kind = "code_keys"
        for key in rng.sample(sorted(CODE_KEYS), rng.randint(1, 3)):
            cfg[key] = CODE_KEYS[key]
    elif roll < 0.90:
        kind = "file"
        text = rng.choice([
            b"\xff\xfe\x00garbage", json.dumps(cfg).encode("utf-16"), b"", b"[1, 2]", b'"llama"', b"null",
            _deep(rng.choice((50, 5000, 200000))).encode(),
            json.dumps(cfg).replace('"vocab_size": ', '"vocab_size": 1e400 + ', 1).encode(),
            json.dumps(dict(cfg, vocab_size=float("nan"))).encode(),
            json.dumps(dict(cfg, hidden_size=float("inf"))).encode(),
            json.dumps(dict(cfg, num_hidden_layers=1e400)).encode(),
            ('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}").encode(),
            json.dumps(cfg)[: rng.randint(1, 40)].encode(),
        ])
        return kind, text, _flags(rng)
    else:
        kind = "flags"
    return kind, json.dumps(cfg).encode(), _flags(rng)


def _flags(rng: random.Random) -> list[str]:
    """Setup flags: mostly defaults, sometimes odd or contradictory."""
    argv: list[str] = []
    choices = {"--mode": ("inference", "eval", "full", "lora", "qlora"),
               "--precision": ("fp32", "bf16", "amp-bf16", "mixed-bf16", "fp16"),
               "--attn": ("eager", "sdpa", "flash"), "--device": ("cuda", "cpu"),
               "--batch": ("1", "4", "0", "-1", "1e3", "99999"), "--seq": ("1", "128", "512", "4096", "0"),
               "--new-tokens": ("0", "16", "-3"), "--optimizer": ("adamw", "sgd", "adafactor"),
               "--lora-targets": ("q_proj,v_proj", "c_attn", "all-linear", ","),
               "--quant": ("none", "nf4", "int8"), "--world-size": ("1", "2", "8"),
               "--sharding": ("none", "zero3", "fsdp", "ddp")}
    for flag, values in choices.items():
        if rng.random() < 0.12:
            argv += [flag, rng.choice(values)]
    if rng.random() < 0.1:
        argv.append("--grad-ckpt")
    return argv


def run_case(path: str, argv: list[str], command: str) -> tuple[int | None, str, str, str]:
    """(exit code or None, stdout, stderr, escaped traceback) of one in-process call."""
    out, err = io.StringIO(), io.StringIO()
    escaped = ""
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if command == "fit":
                code = main(["fit", path, "--memory", "24GiB", "--json", *argv])
            else:
                code = main(["estimate", path, "--json", *argv])
    except BaseException:  # noqa: B036 - the fuzzer counts everything that escapes
        code, escaped = None, traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), escaped


def judge(code, out: str, err: str, escaped: str) -> tuple[str, str]:
    """(outcome, why) with outcome in exit-0 / exit-2 / other."""
    if escaped:
        return "other", "escaped: " + escaped.strip().splitlines()[-1][:160]
    if "Traceback" in err:
        return "other", f"traceback on stderr (exit {code})"
    if code == 2:
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("vramlab: error: "):
            return "other", f"exit 2 with {len(lines)} stderr lines: {err[:160]!r}"
        return "exit-2", lines[0]
    if code != 0:
        return "other", f"exit {code}: {err.strip()[:160]}"
    try:
        answer = json.loads(out)
    except json.JSONDecodeError:
        return "other", "exit 0 without a JSON answer"
    comps = answer.get("components") or {}  # estimate --json; fit --json has total_bytes only
    numbers = [answer.get("total_bytes"), *comps.values()]
    bad = [n for n in numbers if not isinstance(n, int) or isinstance(n, bool) or n < 0]  # NaN is a float
    if bad:
        return "other", f"exit 0 with bytes {bad[:3]}"
    if comps and answer["total_bytes"] < comps.get("weights", 0):
        return "other", "exit 0 with total_bytes < weights"
    if "params" in answer and (not isinstance(answer["params"], int) or answer["params"] <= 0):
        return "other", f"exit 0 with params {answer['params']!r}"
    return "exit-0", ""


class _Watchdog:
    """Interrupts the main thread (KeyboardInterrupt) when a case runs over its time."""

    def __init__(self, seconds: float):
        self.seconds, self.fired = seconds, False
        self._timer: threading.Timer | None = None

    def __enter__(self):
        import _thread
        self.fired = False

        def fire():
            self.fired = True
            _thread.interrupt_main()
        self._timer = threading.Timer(self.seconds, fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        assert self._timer is not None
        self._timer.cancel()
        return False


def fuzz(n: int, seed: int, timeout_s: float = CASE_TIMEOUT_S) -> dict:
    """Run ``n`` cases; returns counts per outcome and per kind, the failures, and seconds."""
    rng = random.Random(seed)
    shipped = [json.loads(p.read_text()) for p in sorted(MODELS_DIR.glob("*.json"))]
    counts: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    failures: list[tuple[int, str, str, list[str], str]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vramlab-fuzz-") as tmp:
        for i in range(n):
            kind, data, argv = random_case(rng, shipped)
            command = "fit" if rng.random() < 0.15 else "estimate"
            path = os.path.join(tmp, f"case{i}.json")
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                with _Watchdog(timeout_s) as dog:
                    code, out, err, escaped = run_case(path, argv, command)
            except KeyboardInterrupt:  # the watchdog fired between the call and its exit
                code, out, err, escaped = None, "", "", "KeyboardInterrupt"
            outcome, why = judge(code, out, err, escaped)
            if dog.fired:
                outcome, why = "other", f"over {timeout_s:.0f} s"
            counts[outcome] += 1
            by_kind.setdefault(kind, Counter())[outcome] += 1
            if outcome == "other":
                failures.append((i, kind, command, argv, why))
    return {"n": n, "seed": seed, "counts": counts, "by_kind": by_kind, "failures": failures,
            "seconds": time.perf_counter() - start}


def table(result: dict) -> str:
    rows = [("kind", "tried", "exit-0", "exit-2", "other")]
    for kind, c in sorted(result["by_kind"].items()):
        rows.append((kind, str(sum(c.values())), str(c["exit-0"]), str(c["exit-2"]), str(c["other"])))
    c = result["counts"]
    rows.append(("all", str(result["n"]), str(c["exit-0"]), str(c["exit-2"]), str(c["other"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="cases (default 1000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds per case")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    result = fuzz(args.n, seed, args.timeout)
    print(f"vramlab fuzz: {args.n} random configs, seed {seed}, {result['seconds']:.1f} s")
    print(table(result))
    for i, kind, command, flags, why in result["failures"][:40]:
        print(f"  case {i} ({kind}, {command} {' '.join(flags)}): {why}")
    if len(result["failures"]) > 40:
        print(f"  ... and {len(result['failures']) - 40} more")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main_())
