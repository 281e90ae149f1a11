"""Random config dicts, through the API and the CLI (hypothesis, derandomized: the same
examples every run). Whatever the config, the answer is an estimate that makes sense or
one sentence: never a traceback, another exception, a negative or NaN byte count, or a
total below the weights.

The dicts are shipped configs with fields replaced by values of the wrong type, out of
range, inconsistent or merely unusual, fields deleted, keys that load code added, and the
model_type changed; the CLI also gets files that are no JSON object at all.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from estimator.categories import Category
from estimator.estimate import estimate
from estimator.modelspec import MODELS_DIR, spec_from_config
from estimator.setup import Setup
from profiler.cli import main

API_EXAMPLES = 500
CLI_EXAMPLES = 100
COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SHIPPED = {p.stem: json.loads(p.read_text()) for p in sorted(MODELS_DIR.glob("*.json"))}
#: fields memory depends on, in every family's vocabulary (modelspec.spec_from_config)
FIELDS = ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
          "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim", "vocab_size",
          "max_position_embeddings", "n_positions", "num_local_experts", "num_experts_per_tok",
          "word_embed_proj_dim", "tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias",
          "hidden_act", "activation_function", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout",
          "attention_dropout", "final_logit_softcapping", "do_layer_norm_before", "model_type")
CODE_KEYS = {"attn_implementation": "kernels-community/flash-attn", "auto_map": {"AutoConfig": "evil.Config"},
             "trust_remote_code": True, "_attn_implementation": "flash_attention_2"}
#: formula families and names transformers does not know (a known type without a formula
#: builds on the meta device: seconds each, for the fuzz script, not this test)
MODEL_TYPES = ("gpt2", "opt", "llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3",
               "no_such_type", "LLAMA", "")
SETUPS = (Setup(), Setup(mode="inference", new_tokens=8), Setup(mode="eval", batch=2),
          Setup(mode="lora", lora_targets=("all-linear",)), Setup(device="cpu", precision="fp32", grad_ckpt=True),
          Setup(sharding="zero3", world_size=4), Setup(mode="qlora", quant="nf4", seq=128))

values = st.one_of(
    st.integers(-3, 300), st.sampled_from([0, 1, 7, 64, 4096, 10**6, 10**9, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=6),
    st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)


@st.composite
def configs(draw) -> dict:
    config = json.loads(json.dumps(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]))
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            config.pop(key, None)
        else:
            config[key] = draw(values)
    if draw(st.integers(0, 7)) == 0:
        config["model_type"] = draw(st.sampled_from(MODEL_TYPES))
    for key in draw(st.lists(st.sampled_from(sorted(CODE_KEYS)), max_size=2, unique=True)):
        config[key] = CODE_KEYS[key]
    return config


def _check_estimate(d: dict) -> None:
    """The invariants of an answer: integer bytes, none negative; the total is the largest
    phase's sum (the load's included: reserved memory peaks where it will, estimator/estimate.py
    Estimate.total_bytes), at least the peak phase's and at least the weights; reserved
    between allocated and the total."""
    comps = d["components"]
    assert set(comps) == {c.value for c in Category}
    for value in (d["total_bytes"], *comps.values()):
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, d
    for phase in d["phases"].values():
        assert all(isinstance(v, int) and v >= 0 for v in phase.values()), d
    phases = list(d["phases"].values()) + ([d["load"]] if d.get("load") else [])
    assert d["total_bytes"] == max(sum(p.values()) for p in phases) >= sum(comps.values())
    assert d["total_bytes"] >= d["reserved_bytes"] >= d["allocated_bytes"]
    assert d["total_bytes"] >= comps["weights"]
    assert isinstance(d["params"], int) and d["params"] > 0


@settings(max_examples=API_EXAMPLES, **COMMON)
@given(configs(), st.sampled_from(SETUPS))
def test_api_answers_or_raises_one_sentence(config, setup):
    try:
        est = estimate(spec_from_config(config, name="fuzz"), setup)
    except ValueError as exc:  # configcheck.ConfigError and the setup's checks
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        return
    _check_estimate(est.to_dict())


#: files that are no JSON object, or whose numbers are not finite
BAD_FILES = (b"\xff\xfe garbage", b"", b"[1, 2]", b"null", b'{"model_type": "llama", "vocab_size": 1e400}',
             b'{"model_type": "llama", "hidden_size": NaN}', b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}")
FLAGS = (["--json"], ["--json", "--mode", "inference", "--new-tokens", "4"], ["--json", "--device", "cpu"],
         ["--json", "--mode", "lora", "--lora-targets", "all-linear"], ["--json", "--precision", "fp32"],
         ["--json", "--mode", "inference", "--grad-ckpt"], ["--json", "--seq", "64", "--batch", "3"])


@settings(max_examples=CLI_EXAMPLES, **COMMON)
@given(st.one_of(configs().map(lambda c: json.dumps(c).encode()), st.sampled_from(BAD_FILES)),
       st.sampled_from(FLAGS))
def test_cli_exits_0_or_2_never_a_traceback(data, flags):
    with tempfile.TemporaryDirectory(prefix="vramlab-fuzz-") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "wb") as fh:
            fh.write(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["estimate", path, *flags])
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    errors = [line for line in err.getvalue().splitlines() if not line.startswith("vramlab: warning: ")]
    if code == 2:
        assert out.getvalue() == "" and len(errors) == 1 and errors[0].startswith("vramlab: error: "), err.getvalue()
        return
    assert errors == []
    d = json.loads(out.getvalue(), parse_constant=lambda name: math.nan)
    _check_estimate(d)
