"""Bad input fails closed (issue 15): config validation in one place (estimator/configcheck.py
via spec_from_config), the CLI's top level (one line, exit 2 for bad input, 1 for internal
errors, --debug for the traceback), and contradicting flags. One test per case; each checks
the message with ``match=`` and that the CLI prints exactly one line."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from estimator.configcheck import (
    CODE_LOADING_KEYS,
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INT_DIGITS,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_NESTING,
    MAX_POSITIONS,
    MAX_VOCAB,
    ConfigError,
)
from estimator.estimate import estimate
from estimator.modelspec import MODELS_DIR, load_model, spec_from_config
from estimator.setup import Setup

#: the issue's bounds: an unknown model_type's line and an unreachable hub's time
UNKNOWN_TYPE_LINE_CHARS = 200
UNREACHABLE_HUB_S = 3.0

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1000,
              "max_position_embeddings": 512}
TINY_STABLELM = {"model_type": "stablelm", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                 "intermediate_size": 256, "vocab_size": 1000, "max_position_embeddings": 1024}


def _shipped(name: str) -> dict:
    return json.loads((MODELS_DIR / f"{name}.json").read_text())


def _one_error_line(r, pattern: str) -> str:
    """The CLI result failed as bad input: exit 2, nothing on stdout, one line matching ``pattern``."""
    assert r.code == 2, (r.code, r.err)
    assert r.out == ""
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("vramlab: error: ") and "Traceback" not in r.err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _write(tmp_path: Path, data, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return str(path)


# --- 1. the file -----------------------------------------------------------------------------

@pytest.mark.parametrize("data,message", [
    (b"[1, 2]", "holds a JSON list, not an object"),
    (b'"llama"', "holds a JSON str, not an object"),
    (b"null", "holds a JSON null, not an object"),
    (b"", r"is not valid JSON \(line 1"),
    (b'{"model_type": "llama", "hidden_size": 64', r"is not valid JSON \(line 1"),
    (b'\xff\xfe{"model_type": "llama"}', r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    (json.dumps(TINY_LLAMA).encode("utf-16"), "is not UTF-8 text"),
    (b'{"model_type": "llama", "vocab_size": 1e400}', "key 'vocab_size' holds 1e400, not a finite JSON number"),
    (b'{"model_type": "llama", "vocab_size": NaN}', "key 'vocab_size' holds NaN, not a finite JSON number"),
    (b'{"model_type": "llama", "rope_theta": -Infinity}', "key 'rope_theta' holds -Infinity"),
    (b'{"model_type": "llama", "x": {"y": [1, Infinity]}}', r"key 'x\.y\.1' holds Infinity"),
    (('{"model_type": "llama", "hidden_size": ' + "9" * 5000 + "}").encode(),
     rf"key 'hidden_size' holds an integer of 5000 digits \(at most {MAX_INT_DIGITS}\)"),
    (('{"model_type": "llama", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
     rf"nests JSON deeper than {MAX_NESTING} levels at key 'deep'"),
    (('{"model_type": "llama", "deep": ' + "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1) + "}").encode(),
     rf"key 'deep' nests deeper than {MAX_NESTING} levels"),
])
def test_bad_file_is_one_sentence_naming_the_file(cli, tmp_path, data, message):
    path = _write(tmp_path, data)
    line = _one_error_line(cli("estimate", path), message)
    assert path in line


def test_nesting_just_under_the_limit_is_read(tmp_path):
    depth = MAX_NESTING - 1  # the value of a top-level key sits one level down
    config = dict(TINY_LLAMA, deep=json.loads("[" * depth + "]" * depth))
    assert load_model(_write(tmp_path, config)).num_layers == TINY_LLAMA["num_hidden_layers"]


def test_the_api_rejects_what_the_file_reader_does():
    with pytest.raises(ConfigError, match="config of custom is not a JSON object"):
        spec_from_config([1, 2])
    with pytest.raises(ConfigError, match="key 'rope_theta' holds nan"):
        spec_from_config(dict(TINY_LLAMA, rope_theta=float("nan")))
    with pytest.raises(ConfigError, match="config keys must be strings, got 3"):
        spec_from_config({**TINY_LLAMA, 3: "x"})


# --- 1. the fields: types ------------------------------------------------------------------

@pytest.mark.parametrize("value,shown", [
    (True, "true"), (3.5, "3.5"), (12.0, "12.0"), ("12", '"12"'), ([12], "a list"), ({"n": 12}, "an object"),
])
def test_ints_are_json_integers(cli, tmp_path, value, shown):
    with pytest.raises(ConfigError, match=re.escape(f"num_hidden_layers must be a JSON integer, got {shown}")):
        spec_from_config(dict(TINY_LLAMA, num_hidden_layers=value))
    _one_error_line(cli("estimate", _write(tmp_path, dict(TINY_LLAMA, num_hidden_layers=value))),
                    re.escape(f"num_hidden_layers must be a JSON integer, got {shown}"))


@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias", "mlp_bias"])
@pytest.mark.parametrize("value", [1, 0, "true", None])
def test_booleans_are_json_booleans(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be true or false, got {re.escape(json.dumps(value))}"):
        spec_from_config(dict(TINY_LLAMA, **{key: value}))


@pytest.mark.parametrize("model,key", [("gpt2", "resid_pdrop"), ("opt-125m", "dropout"),
                                       ("llama-2-7b", "attention_dropout")])
@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", True])
def test_dropouts_are_probabilities(model, key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a number between 0 and 1"):
        spec_from_config(dict(_shipped(model), **{key: value}))


@pytest.mark.parametrize("value,message", [
    (None, "missing the field 'model_type'"), (12, "model_type must be a name like 'llama'"),
    ("", "model_type must be a name"), ("../../etc", "model_type must be a name"),
])
def test_model_type_is_a_name(value, message):
    config = dict(TINY_LLAMA)
    config["model_type"] = value
    if value is None:
        del config["model_type"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        spec_from_config(config)


# --- 1. the fields: ranges with named limits -------------------------------------------------

#: (config, key, limit): each limit at its top is read, one above is an error naming the limit
LIMITS = [
    ("llama", "num_hidden_layers", MAX_LAYERS),
    ("llama", "vocab_size", MAX_VOCAB),
    ("llama", "intermediate_size", MAX_INTERMEDIATE),
    ("llama", "max_position_embeddings", MAX_POSITIONS),
    ("llama", "head_dim", MAX_HEAD_DIM),
    ("gpt2", "n_layer", MAX_LAYERS),
    ("gpt2", "vocab_size", MAX_VOCAB),
    ("opt", "ffn_dim", MAX_INTERMEDIATE),
]


def _base(family: str) -> dict:
    return {"llama": TINY_LLAMA, "gpt2": _shipped("gpt2"), "opt": _shipped("opt-125m")}[family]


@pytest.mark.parametrize("family,key,limit", LIMITS)
def test_limits_just_under_pass_just_over_fail(family, key, limit):
    assert spec_from_config(dict(_base(family), **{key: limit.hi})).name == "custom"
    with pytest.raises(ConfigError, match=rf"{key} must be between {limit.lo} and {limit.hi:,}, "
                                          rf"got {limit.hi + 1:,} \({limit.name}: "):
        spec_from_config(dict(_base(family), **{key: limit.hi + 1}))


def test_width_limits_hidden_and_heads():
    wide = dict(TINY_LLAMA, hidden_size=MAX_HIDDEN.hi, num_attention_heads=MAX_HEADS.hi,
                num_key_value_heads=MAX_HEADS.hi)
    assert spec_from_config(wide).hidden_size == MAX_HIDDEN.hi
    with pytest.raises(ConfigError, match=rf"hidden_size must be between 1 and {MAX_HIDDEN.hi:,}.*MAX_HIDDEN"):
        spec_from_config(dict(wide, hidden_size=MAX_HIDDEN.hi + MAX_HEADS.hi))
    with pytest.raises(ConfigError, match=rf"num_attention_heads must be between 1 and {MAX_HEADS.hi:,}"):
        spec_from_config(dict(wide, num_attention_heads=2 * MAX_HEADS.hi))


def test_experts_limit():
    moe = dict(_shipped("mixtral-8x7b"), num_local_experts=MAX_EXPERTS.hi)
    assert spec_from_config(moe).num_experts == MAX_EXPERTS.hi
    with pytest.raises(ConfigError, match=rf"num_local_experts must be between 0 and {MAX_EXPERTS.hi:,}.*MAX_EXPERTS"):
        spec_from_config(dict(moe, num_local_experts=MAX_EXPERTS.hi + 1))


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                                 "num_key_value_heads", "intermediate_size", "head_dim"])
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_are_positive(cli, tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key} must be between 1 and"):
        spec_from_config(dict(TINY_LLAMA, **{key: value}))


def test_huge_layer_count_is_an_error_not_a_memory_error(cli, tmp_path):
    _one_error_line(cli("estimate", _write(tmp_path, dict(TINY_LLAMA, num_hidden_layers=10**8))),
                    r"num_hidden_layers must be between 1 and 1,024, got 100,000,000 \(MAX_LAYERS")


def test_missing_field_names_the_file(tmp_path):
    config = {k: v for k, v in TINY_LLAMA.items() if k != "vocab_size"}
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: config is missing the field 'vocab_size'")):
        load_model(path)


# --- 1. the fields: shapes ---------------------------------------------------------------------

def test_heads_must_divide_hidden(cli, tmp_path):
    config = dict(TINY_LLAMA, num_attention_heads=7, num_key_value_heads=7)
    _one_error_line(cli("estimate", _write(tmp_path, config)),
                    "7 attention heads do not divide the hidden size 64; fix num_attention_heads or give head_dim")
    assert spec_from_config(dict(config, head_dim=16)).q_dim == 7 * 16  # Gemma-style: head_dim given
    gpt2 = dict(_shipped("gpt2"), n_head=7)
    with pytest.raises(ConfigError, match="7 attention heads do not divide the hidden size 768"):
        spec_from_config(gpt2)


def test_kv_heads_must_divide_heads(cli, tmp_path):
    config = dict(TINY_LLAMA, num_attention_heads=8, num_key_value_heads=3)
    _one_error_line(cli("estimate", _write(tmp_path, config)),
                    "3 key/value heads do not divide the 8 attention heads")
    with pytest.raises(ConfigError, match="9 key/value heads do not divide the 8 attention heads"):
        spec_from_config(dict(config, num_key_value_heads=9))


@pytest.mark.parametrize("per_token", [0, 9])
def test_experts_per_token_at_most_experts(per_token):
    with pytest.raises(ConfigError, match=f"num_experts_per_tok must be between 1 and num_local_experts "
                                          rf"\(8\), got {per_token}"):
        spec_from_config(dict(_shipped("mixtral-8x7b"), num_experts_per_tok=per_token))
    assert spec_from_config(dict(_shipped("mixtral-8x7b"), num_experts_per_tok=8)).experts_per_token == 8


def test_every_shipped_config_passes():
    for path in sorted(MODELS_DIR.glob("*.json")):
        spec = load_model(path.stem)
        assert spec.ignored_keys == () and spec.has_formula, path.stem


# --- 1. the meta-build fallback: same limits, a time limit ----------------------------------

def test_fallback_gets_the_same_limits(tmp_path):
    nested = dict(TINY_STABLELM, text_config={"num_hidden_layers": MAX_LAYERS.hi + 1})
    spec = load_model(_write(tmp_path, nested))
    with pytest.raises(ConfigError, match=r"text_config\.num_hidden_layers must be between 0 and 1,024.*MAX_LAYERS"):
        estimate(spec, Setup(seq=16))
    spec = load_model(_write(tmp_path, dict(TINY_STABLELM, num_experts=10**6), "moe.json"))
    with pytest.raises(ConfigError, match=r"num_experts must be between 0 and 4,096, got 1,000,000"):
        estimate(spec, Setup(seq=16))


def test_fallback_build_has_a_time_limit(tmp_path, monkeypatch):
    import transformers

    import estimator.archs.meta as meta

    def slow_for_model(*args, **kwargs):
        time.sleep(5)  # stands for a config whose build takes too long
    monkeypatch.setattr(meta, "META_BUILD_TIMEOUT_S", 0.2)
    monkeypatch.setattr(transformers.AutoConfig, "for_model", slow_for_model)
    spec = load_model(_write(tmp_path, TINY_STABLELM))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"building model_type 'stablelm' of .* on the meta device took over 0 s"):
        meta.build_meta_model(spec)
    assert time.perf_counter() - start < 2.0  # stopped at the limit, not after the 5 s


def test_unknown_model_type_fits_in_200_characters(cli, tmp_path):
    long_dir = tmp_path / ("a-folder-with-a-rather-long-name-" * 3)
    long_dir.mkdir()
    path = _write(long_dir, dict(TINY_STABLELM, model_type="no_such_architecture_at_all"))
    line = _one_error_line(cli("estimate", path), "transformers cannot build model_type 'no_such_architecture_at_all'")
    assert len(line) <= UNKNOWN_TYPE_LINE_CHARS, (len(line), line)
    line = _one_error_line(cli("estimate", _write(tmp_path, dict(TINY_STABLELM, model_type="t5"))),
                           "model_type 't5' .*no causal LM")
    assert len(line) <= UNKNOWN_TYPE_LINE_CHARS
    line = _one_error_line(cli("estimate", _write(tmp_path, dict(TINY_STABLELM, model_type="lama"))),
                           "did you mean llama")
    assert len(line) <= UNKNOWN_TYPE_LINE_CHARS


# --- 1. keys that load code or kernels never reach transformers -------------------------------

HUB_KERNEL = "kernels-community/flash-attn"


def _spy_for_model(monkeypatch) -> list[dict]:
    import transformers
    seen: list[dict] = []
    real = transformers.AutoConfig.for_model

    def spy(model_type, *args, **kwargs):
        seen.append(dict(kwargs))
        return real(model_type, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoConfig, "for_model", spy)
    return seen


def test_code_keys_are_stripped_and_named(cli, tmp_path):
    config = dict(TINY_LLAMA, attn_implementation=HUB_KERNEL, auto_map={"AutoConfig": "x.Y"},
                  trust_remote_code=True, text_config={"_attn_implementation": "flash_attention_2"})
    spec = spec_from_config(config)
    assert set(spec.ignored_keys) == {"attn_implementation", "auto_map", "trust_remote_code",
                                      "text_config._attn_implementation"}
    assert not CODE_LOADING_KEYS & set(spec.config) and spec.config["text_config"] == {}
    assert spec == spec_from_config(TINY_LLAMA)  # the same model
    r = cli("estimate", _write(tmp_path, config))
    assert r.code == 0, r.err
    assert "note: ignored config keys that would load code or kernels: attn_implementation" in r.out


def test_a_hub_kernel_in_a_fallback_config_never_reaches_transformers(tmp_path, monkeypatch):
    seen = _spy_for_model(monkeypatch)
    config = dict(TINY_STABLELM, attn_implementation=HUB_KERNEL, experts_implementation=HUB_KERNEL,
                  auto_map={"AutoModelForCausalLM": "evil.Model"}, custom_pipelines={"p": {"impl": "evil.P"}})
    est = estimate(load_model(_write(tmp_path, config)), Setup(seq=16, allow_llama_fallback=True))
    assert est.params > 0 and any("ignored config keys" in note for note in est.notes)
    assert seen and all(not CODE_LOADING_KEYS & set(kw) for kw in seen)


def test_profiler_config_drops_code_keys(monkeypatch):
    from estimator.modelspec import ModelSpec
    from profiler.measure.build import hf_config
    seen = _spy_for_model(monkeypatch)
    base = load_model("gemma-2-2b")
    # a spec made by hand, bypassing spec_from_config, still never hands the keys on
    raw = dict(base.config, attn_implementation="sdpa", _attn_implementation=HUB_KERNEL)
    spec = ModelSpec(**{f: getattr(base, f) for f in base.__dataclass_fields__ if f != "config"}, config=raw)
    cfg = hf_config(spec)
    assert cfg.model_type == "gemma2" and getattr(cfg, "_attn_implementation", None) in (None, "eager")
    assert seen and all(not CODE_LOADING_KEYS & set(kw) for kw in seen)


# --- 2. the CLI's top level ---------------------------------------------------------------------

def _boom(exc: BaseException):
    def raise_it(*args, **kwargs):
        raise exc
    return raise_it


@pytest.mark.parametrize("exc,code,pattern", [
    (RuntimeError("kaboom\nsecond line"), 1,
     r"^vramlab: internal error: RuntimeError: kaboom second line \(a bug: rerun with --debug"),
    (ZeroDivisionError("integer division or modulo by zero"), 1, r"^vramlab: internal error: ZeroDivisionError"),
    (MemoryError(), 1, r"^vramlab: internal error: MemoryError"),
    (TypeError("unhashable type: 'dict'"), 2, r"^vramlab: error: unhashable type: 'dict'$"),
    (IsADirectoryError(21, "Is a directory"), 2, r"^vramlab: error: \[Errno 21\] Is a directory"),
    (KeyboardInterrupt(), 130, r"^vramlab: interrupted$"),
])
def test_top_level_turns_any_exception_into_one_line(cli, monkeypatch, exc, code, pattern):
    import estimator.estimate
    monkeypatch.setattr(estimator.estimate, "estimate", _boom(exc))
    r = cli("estimate", "gpt2")
    assert r.code == code and r.out == ""
    assert len(r.err.splitlines()) == 1 and "Traceback" not in r.err, r.err
    assert re.search(pattern, r.err.strip()), r.err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(cli, monkeypatch, where):
    import estimator.estimate
    monkeypatch.setattr(estimator.estimate, "estimate", _boom(RuntimeError("kaboom")))
    argv = ["--debug", "estimate", "gpt2"] if where == "before" else ["estimate", "gpt2", "--debug"]
    r = cli(*argv)
    assert r.code == 1
    assert r.err.startswith("Traceback (most recent call last):") and "RuntimeError: kaboom" in r.err
    assert r.err.splitlines()[-1].startswith("vramlab: internal error: RuntimeError: kaboom")


def test_exit_codes_are_documented(cli):
    r = cli("--help")
    assert r.code == 0
    text = " ".join(r.out.split())
    assert "--debug" in text and "2 bad input" in text and "internal error" in text and "130 interrupted" in text
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "--debug" in readme and "exit code 2" in readme and "exit code 1" in readme


def test_closed_stdout_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "profiler.cli", "estimate", "llama-2-7b", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write (as `| head -0` would)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == b""


# --- 3. flags that contradict each other ----------------------------------------------------------

@pytest.mark.parametrize("argv,pattern", [
    (["estimate", "gpt2", "--new-tokens", "16"],
     r"--new-tokens 16 applies to --mode inference .*--mode full runs on --seq tokens"),
    (["estimate", "gpt2", "--mode", "lora", "--lora-targets", "c_attn", "--new-tokens", "8"],
     "--new-tokens 8 applies to --mode inference"),
    (["estimate", "gpt2", "--mode", "eval", "--new-tokens", "8"], "--new-tokens 8 applies to --mode inference"),
    (["estimate", "gpt2", "--attn", "flash", "--device", "cpu"],
     r"--attn flash \(FlashAttention-2\) runs on CUDA only"),
    (["estimate", "gpt2", "--attn", "flash", "--precision", "fp32"],
     "--attn flash needs 16-bit attention inputs .* with --precision fp32"),
    (["fit", "gpt2", "--memory", "8GiB", "--attn", "flash", "--device", "cpu"], "--attn flash .* CUDA only"),
    (["profile", "gpt2", "--backend", "cpu", "--attn", "flash"], "--attn flash .* CUDA only"),
    (["estimate", "gpt2", "--gpu", ""], r"--gpu is empty; name a GPU preset \(a10, .*h100-80gb"),
    (["estimate", "gpt2", "--gpu", "  "], "--gpu is empty"),
    (["fit", "gpt2", "--gpu", ""], "--gpu is empty"),
    (["fit", "gpt2", "--memory", ""], "--memory is empty"),
    (["estimate", "gpt2", "--mode", "lora"],
     r"the default LoRA targets q_proj,v_proj are not modules of gpt2 \(gpt2\); pass --lora-targets with some of: "
     r"c_attn, c_fc, c_proj or all-linear \(peft's default here: c_attn\)"),
    (["estimate", "phi-3-mini", "--mode", "lora"], r"some of: down_proj, gate_up_proj, o_proj, qkv_proj"),
])
def test_contradicting_flags_are_one_line_errors(cli, argv, pattern):
    _one_error_line(cli(*argv), pattern)


@pytest.mark.parametrize("flags", [["--grad-ckpt"], ["--optimizer", "sgd"], ["--optimizer-impl", "fused"],
                                   ["--grad-ckpt", "--optimizer", "adafactor"]])
@pytest.mark.parametrize("mode", ["inference", "eval"])
def test_training_flags_with_inference_warn_and_are_ignored(cli, flags, mode):
    r = cli("estimate", "gpt2", "--mode", mode, "--json", *flags)
    assert r.code == 0
    given = [f for f in flags if f.startswith("--")]
    lines = r.err.splitlines()
    assert len(lines) == len(given)
    for flag, line in zip(given, lines):
        assert re.fullmatch(f"vramlab: warning: {flag} has no effect with --mode {mode} .*; ignored", line), line
    setup = json.loads(r.out)["setup"]
    assert (setup["grad_ckpt"], setup["optimizer"], setup["optimizer_impl"]) == (False, "adamw", "auto")
    plain = cli("estimate", "gpt2", "--mode", mode, "--json")
    assert json.loads(plain.out)["total_bytes"] == json.loads(r.out)["total_bytes"]


def test_a_failing_command_prints_its_error_only(cli):
    # a warning about an ignored flag is not printed beside an error
    _one_error_line(cli("estimate", "gpt2", "--mode", "inference", "--grad-ckpt", "--seq", "5000"),
                    "seq 5000 is beyond gpt2's 1024 positions")


def test_lora_with_explicit_gpt2_targets_and_fit_ladder(cli):
    assert cli("estimate", "gpt2", "--mode", "lora", "--lora-targets", "c_attn").code == 0
    r = cli("fit", "gpt2", "--memory", "4GiB", "--json")  # the ladder's LoRA rows use peft's default: c_attn
    assert r.code == 0, r.err
    lora = [s for s in json.loads(r.out)["strategies"] if s["setup"]["mode"] == "lora"]
    assert lora and all(s["setup"]["lora_targets"] == ["c_attn"] for s in lora)


@pytest.mark.parametrize("model", ["gpt2", "llama-2-7b", "mixtral-8x7b"])
@pytest.mark.parametrize("memory", ["1GiB", "24GiB", "80GB", "200GiB"])
@pytest.mark.parametrize("mode", ["full", "lora", "inference"])
def test_fit_never_says_safe_and_needs_gpus_together(cli, model, memory, mode):
    flags = ["--lora-targets", "c_attn"] if model == "gpt2" and mode == "lora" else []
    r = cli("fit", model, "--memory", memory, "--mode", mode, *flags)
    assert r.code == 0, r.err
    flat = " ".join(r.out.split())  # the verdict sentence, wrapped at the terminal's width
    verdict = flat[flat.rindex("The setup as given"):]
    said = [v for v, text in (("safe", "as given is safe"), ("uncertain", "as given is uncertain"),
                               ("does_not_fit", "as given does not fit")) if text in verdict]
    needs = "ZeRO-3 needs" in verdict
    assert len(said) == 1, verdict
    assert not (said == ["safe"] and needs), verdict
    d = json.loads(cli("fit", model, "--memory", memory, "--mode", mode, "--json", *flags).out)
    assert d["verdict"] == said[0]
    assert not (d["verdict"] == "safe" and d["min_gpus_zero3"])
    assert d["allocated_bytes"] <= d["reserved_bytes"] <= d["total_bytes"]


# --- 3. an unreachable hub fails fast ------------------------------------------------------------

def test_unreachable_hub_fails_in_3_seconds_with_one_line():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    for endpoint in ("http://127.0.0.1:9", "https://no-such-host.invalid"):  # refused; no such name (RFC 2606)
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "profiler.cli", "estimate", "someorg/not-cached-model"],
                           capture_output=True, text=True, timeout=60, env=dict(env, HF_ENDPOINT=endpoint,
                                                                                HF_HOME="/nonexistent-hf-home"))
        elapsed = time.perf_counter() - start
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1, r.stderr
        assert re.search("'someorg/not-cached-model' is not in the local Hugging Face cache and the hub is "
                         "unreachable", r.stderr), r.stderr
        assert elapsed <= UNREACHABLE_HUB_S, elapsed


def test_a_hub_that_never_answers_fails_in_3_seconds(cli, monkeypatch):
    """A connection that hangs (a firewall dropping packets): the probe gives up, not the OS."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def hang(*args, **kwargs):
        time.sleep(30)
    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    _one_error_line(cli("estimate", "someorg/not-cached-model"), "the hub is unreachable .* within 2 s")
    assert time.perf_counter() - start <= UNREACHABLE_HUB_S


def test_offline_hub_is_one_line(cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    _one_error_line(cli("estimate", "someorg/not-cached-model"), "HF_HUB_OFFLINE is set")
