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
from .hub import download_config, from_hf_cache

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
    #: (name, value) pairs a family reads beyond these fields (DeepSeek-V3's latent ranks and
    #: head sizes): part of the hash, so the caches keyed by a spec tell such configs apart
    family_fields: tuple[tuple[str, Any], ...] = ()
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
    # a shipped name is a bare word: MODELS_DIR / "/abs/x.json" would be the absolute file
    bare = not any(sep in name for sep in ("/", "\\")) and not name.startswith((".", "~"))
    registry = MODELS_DIR / f"{name.lower()}.json"
    if bare and registry.is_file():
        return spec_from_config(_read_json(registry), name=name.lower(), source=f"registry:{name.lower()}")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"folder {path} has no config.json")
        return spec_from_config(_read_json(path / "config.json"), name=path.resolve().name, source=str(path))
    if path.is_file():
        # a checkpoint's config.json is titled by its folder, another file by its name
        title = path.resolve().parent.name if path.name == "config.json" else path.stem
        return spec_from_config(_read_json(path), name=title or path.stem, source=str(path))
    if path.exists():
        raise ValueError(f"{path} is not a config.json file or a folder holding one")
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1
    if looks_like_path:
        raise ValueError(f"no such file or folder: {path} (a model is a shipped name, a config.json path or "
                         f"a hub id like org/name)")
    if name.count("/") == 1 and not name.startswith((".", "/")) and not name.endswith(".json"):
        shipped = _source_index().get(name.lower())
        if shipped:
            return load_model(shipped)
        cached = from_hf_cache(name) or download_config(name)
        return spec_from_config(_read_json(cached), name=name, source=f"hf:{name}")
    close = difflib.get_close_matches(name.lower(), registry_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped: {', '.join(registry_names())}"
    raise ValueError(f"unknown model {name!r}: not a shipped name, a config.json path or a hub id{hint}")
