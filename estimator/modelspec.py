"""ModelSpec: the numbers of a model that memory depends on, read from its config.json.

A model is named by a shipped registry name (``estimator/data/models/*.json``), a
local ``config.json`` file or a folder holding one, or a Hugging Face hub id found in
the local HF cache (or downloaded when the network allows). Field names and defaults
follow each architecture's configuration class in transformers
(``transformers/models/<type>/configuration_<type>.py``).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configcheck import (
    MAX_EXPERTS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_HIDDEN,
    MAX_INTERMEDIATE,
    MAX_LAYERS,
    MAX_POSITIONS,
    MAX_VOCAB,
    ConfigError,
    Fields,
    check_model_type,
    check_shapes,
    check_values,
    parse_config_bytes,
    strip_code_keys,
    where_of,
)

MODELS_DIR = Path(__file__).parent / "data" / "models"

#: Llama-style decoders: RMSNorm, rotary positions, gated (SwiGLU/GeGLU) MLP, GQA.
LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")
#: Families with a closed-form parameter and activation formula here.
FAMILIES = LLAMA_LIKE + ("gpt2", "opt", "gpt_neox", "biogpt")

#: ``tie_word_embeddings`` default of each configuration class when a config.json omits it
#: (LlamaConfig/MistralConfig/MixtralConfig/Qwen2Config/Phi3Config pass False;
#: GemmaConfig/Gemma2Config pass True; GPT2Config and OPTConfig keep PretrainedConfig's True;
#: GPTNeoXConfig declares False, BioGptConfig True: configuration_gpt_neox.py:78,
#: configuration_biogpt.py:61 in transformers 5.24).
_TIE_DEFAULT = {"llama": False, "mistral": False, "mixtral": False, "qwen2": False,
                "phi3": False, "gemma": True, "gemma2": True, "gpt2": True, "opt": True,
                "gpt_neox": False, "biogpt": True}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers in transformers' vocabulary (h, L, a, kv, d, f, V)."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    gated_mlp: bool
    hidden_act: str
    norm: str  # "rmsnorm" | "layernorm"
    norms_per_layer: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    num_experts: int = 0  # MoE experts per layer (0: dense)
    experts_per_token: int = 0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    learned_positions: int = 0  # rows of a learned position table (GPT-2, OPT); 0 = rotary
    embed_dim: int = 0  # OPT word_embed_proj_dim when it differs from hidden_size
    logit_softcap: bool = False  # Gemma 2: logits = tanh(logits / cap) * cap (final_logit_softcapping)
    source: str = ""  # where the config came from
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    #: config keys that would load code or kernels, dropped before transformers sees the config
    ignored_keys: tuple[str, ...] = field(default=(), compare=False, hash=False)

    def __hash__(self) -> int:  # cached: specs key the estimator's caches
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__
                                if f not in ("config", "ignored_keys")))
            object.__setattr__(self, "_hash", cached)
        return cached

    @property
    def family(self) -> str:
        """``"llama"`` for every Llama-style decoder, else the model_type; ``"other"`` if unknown."""
        if self.model_type in LLAMA_LIKE:
            return "llama"
        return self.model_type if self.model_type in FAMILIES else "other"

    @property
    def has_formula(self) -> bool:
        return self.model_type in FAMILIES

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical config JSON (sorted keys), first 16 hex digits."""
        text = json.dumps(dict(self.config), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_from_config(config: Mapping[str, Any], name: str = "custom", source: str = "") -> ModelSpec:
    """Normalise and check a config.json dict: the one place a config is validated
    (``configcheck``). Raises :class:`~estimator.configcheck.ConfigError` (a ``ValueError``)
    naming the file (``source``, else ``name``) and the key. Keys that load code or kernels
    are dropped here, before any transformers config is built, and kept in ``ignored_keys``."""
    where = where_of(source, name)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config of {where} is not a JSON object")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{where}: config keys must be strings, got {bad_keys[0]!r}")
    check_values(config, where)
    config, ignored = strip_code_keys({k: v for k, v in config.items() if not k.startswith("_vramlab")})
    model_type = check_model_type(config, where)
    f = Fields(config, where)
    tie = f.bool("tie_word_embeddings", _TIE_DEFAULT.get(model_type, True))
    common = dict(name=name, model_type=model_type, tie_word_embeddings=tie, source=source, config=config,
                  ignored_keys=ignored)
    if model_type == "gpt2":
        h = f.int("n_embd", "hidden_size", limit=MAX_HIDDEN)
        heads = f.int("n_head", "num_attention_heads", limit=MAX_HEADS)
        check_shapes(where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("n_positions", "max_position_embeddings", limit=MAX_POSITIONS)
        return ModelSpec(
            hidden_size=h, num_layers=f.int("n_layer", "num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("n_inner", limit=MAX_INTERMEDIATE, default=4 * h),  # GPT2MLP: n_inner or 4*h
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("activation_function", default="gelu_new"),
            norm="layernorm", norms_per_layer=2, qkv_bias=True, o_bias=True, mlp_bias=True,
            # GPT2Config defaults: resid/embd/attn_pdrop = 0.1
            attn_dropout=f.fraction("attn_pdrop", 0.1), resid_dropout=f.fraction("resid_pdrop", 0.1),
            embd_dropout=f.fraction("embd_pdrop", 0.1), learned_positions=positions, **common)
    if model_type == "opt":
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("max_position_embeddings", limit=MAX_POSITIONS)
        bias = f.bool("enable_bias", True)
        f.bool("do_layer_norm_before", True)  # read by params._final_norms
        f.bool("_remove_final_layer_norm", False)
        return ModelSpec(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("ffn_dim", limit=MAX_INTERMEDIATE),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("activation_function", default="relu"),
            norm="layernorm", norms_per_layer=2, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
            # OPTConfig defaults: dropout 0.1, attention_dropout 0.0
            attn_dropout=f.fraction("attention_dropout", 0.0),
            resid_dropout=f.fraction("dropout", 0.1), embd_dropout=f.fraction("dropout", 0.1),
            # OPTLearnedPositionalEmbedding keeps an offset of 2 rows (modeling_opt.py)
            learned_positions=positions + 2,
            embed_dim=f.int("word_embed_proj_dim", limit=MAX_HIDDEN, default=h), **common)
    if model_type == "gpt_neox":
        # GPTNeoXConfig (transformers 5.24 configuration_gpt_neox.py:61-82): fused
        # query_key_value, partial rotary (rotary_pct, default 0.25), parallel residual
        # (use_parallel_residual, default True), biases on every linear (attention_bias True),
        # hidden_dropout and attention_dropout default 0.0; the untied head is ``embed_out``
        # (4.x) or ``lm_head`` (5.x)
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        bias = f.bool("attention_bias", True)
        f.bool("use_parallel_residual", True)  # read by activations (the two norms share their input)
        f.fraction("rotary_pct", 0.25)
        return ModelSpec(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("intermediate_size", limit=MAX_INTERMEDIATE),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB),
            max_positions=f.int("max_position_embeddings", limit=MAX_POSITIONS, default=2048), gated_mlp=False,
            hidden_act=f.text("hidden_act", default="gelu"), norm="layernorm", norms_per_layer=2,
            qkv_bias=bias, o_bias=bias, mlp_bias=True,
            attn_dropout=f.fraction("attention_dropout", 0.0), resid_dropout=f.fraction("hidden_dropout", 0.0),
            embd_dropout=f.fraction("hidden_dropout", 0.0), **common)
    if model_type == "biogpt":
        # BioGptConfig (5.24 configuration_biogpt.py:43-61): OPT-like pre-LN decoder with
        # q/k/v/out_proj and fc1/fc2 (all with bias), GELU, learned positions with an offset of
        # 2 rows (modeling_biogpt.py:57-59), word embeddings scaled by sqrt(h) (scale_embedding),
        # hidden_dropout_prob and attention_probs_dropout_prob default 0.1, tied output_projection
        h = f.int("hidden_size", limit=MAX_HIDDEN)
        heads = f.int("num_attention_heads", limit=MAX_HEADS)
        check_shapes(where, h, heads, heads, head_dim_given=False, experts=0, experts_per_token=0)
        positions = f.int("max_position_embeddings", limit=MAX_POSITIONS, default=1024)
        f.bool("scale_embedding", True)
        f.fraction("activation_dropout", 0.0)
        f.fraction("layerdrop", 0.0)
        return ModelSpec(
            hidden_size=h, num_layers=f.int("num_hidden_layers", limit=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
            intermediate_size=f.int("intermediate_size", limit=MAX_INTERMEDIATE, default=4096),
            vocab_size=f.int("vocab_size", limit=MAX_VOCAB), max_positions=positions, gated_mlp=False,
            hidden_act=f.text("hidden_act", default="gelu"), norm="layernorm", norms_per_layer=2,
            qkv_bias=True, o_bias=True, mlp_bias=True,
            attn_dropout=f.fraction("attention_probs_dropout_prob", 0.1),
            resid_dropout=f.fraction("hidden_dropout_prob", 0.1), embd_dropout=f.fraction("hidden_dropout_prob", 0.1),
            learned_positions=positions + 2, **common)
    # Llama-style decoders and the fallback for anything else with the common names.
    h = f.int("hidden_size", "n_embd", "d_model", limit=MAX_HIDDEN)
    heads = f.int("num_attention_heads", "n_head", limit=MAX_HEADS)
    kv = f.int("num_key_value_heads", limit=MAX_HEADS, default=heads)  # LlamaConfig: None -> heads
    head_dim = f.int("head_dim", limit=MAX_HEAD_DIM, default=0)
    experts = f.int("num_local_experts", limit=MAX_EXPERTS, default=0)
    per_token = f.int("num_experts_per_tok", limit=MAX_EXPERTS, default=0)
    check_shapes(where, h, heads, kv, head_dim_given=bool(head_dim), experts=experts, experts_per_token=per_token)
    attention_bias = f.bool("attention_bias", False)
    softcap = f.number("final_logit_softcapping")
    return ModelSpec(
        hidden_size=h, num_layers=f.int("num_hidden_layers", "n_layer", limit=MAX_LAYERS),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim or h // heads,
        intermediate_size=f.int("intermediate_size", "ffn_dim", "n_inner", limit=MAX_INTERMEDIATE),
        vocab_size=f.int("vocab_size", limit=MAX_VOCAB),
        max_positions=f.int("max_position_embeddings", "n_positions", limit=MAX_POSITIONS, default=0),
        gated_mlp=True, hidden_act=f.text("hidden_act", "hidden_activation", default="silu"), norm="rmsnorm",
        # Gemma2DecoderLayer: input, post_attention, pre_feedforward, post_feedforward norms
        norms_per_layer=4 if model_type == "gemma2" else 2,
        # Qwen2Attention: q/k/v with bias, o_proj without (modeling_qwen2.py)
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type != "qwen2" else False,
        mlp_bias=f.bool("mlp_bias", False), num_experts=experts, experts_per_token=per_token,
        attn_dropout=f.fraction("attention_dropout", 0.0), resid_dropout=f.fraction("resid_pdrop", 0.0),
        embd_dropout=f.fraction("embd_pdrop", 0.0), logit_softcap=bool(softcap), **common)


def registry_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object of a config file, checked as text (configcheck.parse_config_bytes)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config_bytes(data, str(path))


def _hf_cache_dirs() -> list[Path]:
    # huggingface_hub constants: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(home / "hub")
    return dirs


def _from_hf_cache(repo_id: str) -> Path | None:
    folder = "models--" + repo_id.replace("/", "--")
    for cache in _hf_cache_dirs():
        snapshots = cache / folder / "snapshots"
        if snapshots.is_dir():
            found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
    return None


#: Seconds to reach the hub before a hub id not in the local cache fails: an unreachable
#: hub (no network, a firewall) is one line within 3 s of the command's start (issue 15),
#: not huggingface_hub's five retries with backoff (about 25 s).
HUB_CONNECT_TIMEOUT_S = 2.0
#: Seconds a reachable hub has to deliver a config.json (a few KB) before the command gives up.
HUB_DOWNLOAD_TIMEOUT_S = 10.0
_OFFLINE_VALUES = ("1", "true", "yes", "on")  # huggingface_hub constants._is_true


def _hub_address() -> tuple[str, int, str]:
    """(host, port, what) of the first hop to the hub: the HTTPS proxy if one is set, else
    the endpoint (``HF_ENDPOINT``, default https://huggingface.co)."""
    from urllib.parse import urlsplit
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            url = urlsplit(os.environ[var] if "//" in os.environ[var] else "//" + os.environ[var])
            return url.hostname or "", url.port or 3128, f"the proxy in {var}"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "", port, f"{url.hostname}:{port}"


def _within(seconds: float, fn, *args, **kwargs):
    """``(True, fn(...))`` if ``fn`` returns within ``seconds``, ``(False, None)`` if not (it
    runs on in a daemon thread, which cannot be stopped); its exception is re-raised."""
    import threading
    done = threading.Event()
    result: list = []

    def call():
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result.append((False, exc))
        done.set()

    threading.Thread(target=call, daemon=True).start()
    if not done.wait(seconds):
        return False, None
    ok, value = result[0]
    if not ok:
        raise value
    return True, value


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection opens within ``timeout_s``, name lookup included
    (``getaddrinfo`` has no timeout of its own, hence the thread)."""
    import socket
    try:
        finished, _ = _within(timeout_s, lambda: socket.create_connection((host, port), timeout=timeout_s).close())
    except (OSError, ValueError):
        return False
    return finished


def _download_config(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES:
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                         f"download its config.json or pass a local path")
    host, port, what = _hub_address()
    if not host or not _reachable(host, port, HUB_CONNECT_TIMEOUT_S):
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and the hub is unreachable "
                         f"(no connection to {what} within {HUB_CONNECT_TIMEOUT_S:.0f} s); pass a local "
                         f"config.json or a shipped name")
    import logging
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no "Retrying in 1s" lines: the error below is the one line
    try:
        from huggingface_hub import hf_hub_download  # lazy: only for hub ids not cached
        finished, path = _within(HUB_DOWNLOAD_TIMEOUT_S, hf_hub_download, repo_id, "config.json",
                                 etag_timeout=HUB_CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - network errors, gated repos, unknown repos
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
                         f"({type(exc).__name__}); pass a local config.json or a shipped name") from None
    finally:
        hub_log.setLevel(level)
    if not finished:
        raise ValueError(f"{repo_id!r} is not in the local Hugging Face cache and its config.json did not "
                         f"arrive within {HUB_DOWNLOAD_TIMEOUT_S:.0f} s; pass a local config.json or a shipped name")
    return Path(path)


def _source_index() -> dict[str, str]:
    """hub id (lower case) -> registry name, from each shipped file's ``_vramlab_source``."""
    index = {}
    for path in MODELS_DIR.glob("*.json"):
        try:
            src = json.loads(path.read_text()).get("_vramlab_source")
        except (OSError, json.JSONDecodeError):
            continue
        if src:
            index[str(src).lower()] = path.stem
    return index


def load_model(name: str) -> ModelSpec:
    """Resolve a registry name, a local path, or a hub id to a ModelSpec."""
    if not name or not str(name).strip():
        raise ValueError("no model given: pass a shipped name (e.g. llama-2-7b), a config.json path or a hub id")
    name = str(name).strip()
    registry = MODELS_DIR / f"{name.lower()}.json"
    if registry.is_file():
        return spec_from_config(_read_json(registry), name=name.lower(), source=f"registry:{name.lower()}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"folder {path} has no config.json")
        return spec_from_config(_read_json(path / "config.json"), name=path.name, source=str(path))
    if path.is_file():
        return spec_from_config(_read_json(path), name=path.stem, source=str(path))
    if name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(".json"):
        shipped = _source_index().get(name.lower())
        if shipped:
            return load_model(shipped)
        cached = _from_hf_cache(name) or _download_config(name)
        return spec_from_config(_read_json(cached), name=name, source=f"hf:{name}")
    close = difflib.get_close_matches(name.lower(), registry_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped: {', '.join(registry_names())}"
    raise ValueError(f"unknown model {name!r}: not a shipped name, a config.json path or a hub id{hint}")
