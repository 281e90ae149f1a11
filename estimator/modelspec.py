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
    ConfigError,
    Fields,
    check_model_type,
    check_values,
    parse_config_bytes,
    strip_code_keys,
    where_of,
)

MODELS_DIR = Path(__file__).parent / "data" / "models"

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
        """The calibration group of its architecture (estimator/archs): ``"llama"`` for every
        Llama-style decoder, ``"other"`` for a model type outside the registry."""
        from .archs import arch_of
        return arch_of(self).family

    @property
    def has_formula(self) -> bool:
        """Whether its model type is in the registry (estimator/archs)."""
        from .archs import arch_of
        return arch_of(self).exact

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
    from .archs import arch_for_type
    arch = arch_for_type(model_type)
    f = Fields(config, where)
    tie = f.bool("tie_word_embeddings", arch.tie_default)
    return ModelSpec(name=name, model_type=model_type, tie_word_embeddings=tie, source=source, config=config,
                     ignored_keys=ignored, **arch.read(f, model_type))


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
