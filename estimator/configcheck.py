"""Reading a model's config.json strictly: the one place a config is checked before it
becomes a ModelSpec (``modelspec.spec_from_config``) or reaches transformers.

- The file: UTF-8 text holding one JSON object, nested at most :data:`MAX_NESTING` deep,
  every number finite (no ``NaN``, ``Infinity`` or ``1e400``) and every integer at most
  :data:`MAX_INT_DIGITS` digits long.
- The fields: integers are JSON integers (not booleans, floats, strings or lists),
  booleans are JSON booleans, each size between 1 and a named limit (below, each with
  its reason), and the shapes agree (:func:`check_shapes`).
- Keys that make transformers load code or kernels (:data:`CODE_LOADING_KEYS`) are
  stripped before any transformers config is built, and named as ignored.

Every problem is a :class:`ConfigError` (a ``ValueError``): one sentence naming the file
and the key.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# --- limits: far above every published model, so they only stop typos and garbage --------


@dataclass(frozen=True)
class Limit:
    """An inclusive range of a config field, and why its top is where it is."""

    name: str
    lo: int
    hi: int
    why: str


#: Decoder layers. The deepest published dense decoders: Llama 3.1 405B 126 layers (Llama 3
#: paper, Grattafiori et al. 2024, Table 3), PaLM 540B 118 (Chowdhery et al. 2022, Table 1),
#: Megatron-Turing NLG 530B 105 (Smith et al. 2022); 1024 is 8x the deepest.
MAX_LAYERS = Limit("MAX_LAYERS", 1, 1024, "8x the deepest published decoder, Llama 3.1 405B's 126 layers")
#: Model width. The widest: MT-NLG 530B 20480, PaLM 540B 18432, Llama 3.1 405B 16384; 2**16 is 3x.
MAX_HIDDEN = Limit("MAX_HIDDEN", 1, 2**16, "3x the widest published model, MT-NLG 530B's 20,480")
#: MLP width. The widest: PaLM 540B 73728 (4 x 18432), T5 11B's d_ff 65536 (Raffel et al. 2020,
#: Sec. 3.7); 2**20 is 14x.
MAX_INTERMEDIATE = Limit("MAX_INTERMEDIATE", 1, 2**20, "14x the widest published MLP, PaLM 540B's 73,728")
#: Attention heads. The most: Llama 3.1 405B's 128 query heads; 1024 is 8x.
MAX_HEADS = Limit("MAX_HEADS", 1, 1024, "8x the most attention heads published, Llama 3.1 405B's 128")
#: Width of one head, where a config gives head_dim: 256 is the widest in use (Gemma, Gemma 2;
#: also FlashAttention-2's largest supported head dimension); 4096 is 16x.
MAX_HEAD_DIM = Limit("MAX_HEAD_DIM", 1, 4096, "16x the widest head in use, Gemma's 256")
#: Vocabulary. The largest: Gemma 3's 262,208 and PaLM's 256k (SentencePiece); 2**22 is 16x.
MAX_VOCAB = Limit("MAX_VOCAB", 1, 2**22, "16x the largest published vocabulary, Gemma 3's 262,208")
#: MoE experts per layer. The most: Switch Transformer's Switch-C with 2048 experts
#: (Fedus et al. 2022, Table 9); DeepSeek-V3 has 256 routed experts. 4096 is 2x Switch-C.
MAX_EXPERTS = Limit("MAX_EXPERTS", 0, 4096, "2x the most experts published, Switch-C's 2,048")
#: Positions. The longest context in a released config: Llama 4 Scout's
#: max_position_embeddings of 10,485,760; 2**27 is 12.8x.
MAX_POSITIONS = Limit("MAX_POSITIONS", 1, 2**27, "12.8x the longest published context, Llama 4 Scout's 10,485,760")
#: Nesting of JSON objects and arrays. transformers configs nest a sub-config (text_config,
#: vision_config) holding a dict (rope_scaling) holding lists: 4 levels; 32 is 8x.
MAX_NESTING = 32
#: Digits of a JSON integer: 20 holds every 64-bit integer (2**64 has 20 digits); Python's
#: own int() stops at 4300 (sys.get_int_max_str_digits) with a message about that, not the key.
MAX_INT_DIGITS = 20
#: Seconds a meta-device build of a model type without a formula may take: Llama 3.1 70B's
#: config with MAX_LAYERS layers builds on meta in about 1.5 s on 2 cores (transformers 5.24,
#: the import aside); 30 s is 20x that.
META_BUILD_TIMEOUT_S = 30.0

#: Config keys that make transformers load code or kernels, or pick an attention or experts
#: implementation (a hub kernel is a name like "kernels-community/flash-attn":
#: transformers/integrations/hub_kernels.py). vramlab picks the implementation from the
#: setup (``--attn``) and never runs remote code (``trust_remote_code`` stays off), so these
#: never reach transformers: transformers/configuration_utils.py pops attn_implementation and
#: experts_implementation from a config's kwargs; models/auto/configuration_auto.py follows
#: auto_map; pipelines follow custom_pipelines.
CODE_LOADING_KEYS = frozenset({
    "auto_map", "trust_remote_code", "custom_pipelines",
    "attn_implementation", "_attn_implementation", "_attn_implementation_internal",
    "_attn_implementation_autoset", "experts_implementation", "_experts_implementation",
    "_experts_implementation_internal", "use_kernels", "kernel_config",
})


class ConfigError(ValueError):
    """A config that cannot describe a model: one sentence naming the file and the key."""


def where_of(source: str, name: str) -> str:
    """How an error names a config: its path, else ``registry:NAME`` or its name."""
    return source or name or "config"


# --- the file ------------------------------------------------------------------------------


class _Bad:
    """A JSON literal that is no usable number, kept until its key is known."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str):
    value = float(text)
    return _Bad(text) if value in (float("inf"), float("-inf")) else value


def _parse_int(text: str):
    return _Bad(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def parse_config_bytes(data: bytes, where: str) -> dict[str, Any]:
    """The JSON object in ``data``; :class:`ConfigError` for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          f"save config.json as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is UTF-8 still
    try:
        obj = json.loads(text, parse_constant=_Bad, parse_float=_parse_float, parse_int=_parse_int)
    except RecursionError:
        raise ConfigError(f"{where} nests JSON deeper than {MAX_NESTING} levels at key "
                          f"{_deep_key(text)!r}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where} holds a JSON {type(obj).__name__.replace('NoneType', 'null')}, "
                          f"not an object; a config.json is one object of fields")
    check_values(obj, where)
    return obj


def _deep_key(text: str) -> str:
    """The top-level key whose value nests deepest (found without parsing)."""
    depth = deepest = 0
    key = found = ""
    in_string = escaped = False
    start = 0
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 1:
                    key = text[start + 1:i]
        elif ch == '"':
            in_string, start = True, i
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest, found = depth, key
        elif ch in "]}":
            depth -= 1
    return found[:60]


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def check_values(obj: Any, where: str, path: tuple = ()) -> None:
    """Every number finite, nesting at most :data:`MAX_NESTING` deep."""
    if len(path) > MAX_NESTING:
        raise ConfigError(f"{where}: key {_path(path[:1])!r} nests deeper than {MAX_NESTING} levels")
    if isinstance(obj, _Bad):
        digits = len(obj.text.lstrip("-"))
        what = f"an integer of {digits} digits (at most {MAX_INT_DIGITS})" if obj.text.lstrip("-").isdigit() \
            else f"{obj.text[:24]}, not a finite JSON number"
        raise ConfigError(f"{where}: key {_path(path)!r} holds {what}")
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{where}: key {_path(path)!r} holds {obj}, not a finite JSON number")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            check_values(value, where, path + (key,))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            check_values(value, where, path + (i,))


def strip_code_keys(config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``config`` without :data:`CODE_LOADING_KEYS` at any depth (sub-configs too), and the
    dotted paths of what was dropped."""
    dropped: list[str] = []

    def clean(obj, path):
        if isinstance(obj, Mapping):
            out = {}
            for key, value in obj.items():
                if key in CODE_LOADING_KEYS:
                    dropped.append(".".join(path + (str(key),)))
                else:
                    out[key] = clean(value, path + (str(key),))
            return out
        if isinstance(obj, list):
            return [clean(v, path + (str(i),)) for i, v in enumerate(obj)]
        return obj

    return clean(config, ()), tuple(dropped)


# --- the fields ----------------------------------------------------------------------------

_MISSING = object()


def _show(value: Any) -> str:
    """A value as an error quotes it: JSON for scalars (``3.5``, ``"12"``, ``true``), the kind otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        text = f"an integer of {value.bit_length()} bits"
    elif isinstance(value, bool | int | float | str | type(None)):
        text = json.dumps(value)
    elif isinstance(value, list | tuple):
        text = "a list"
    elif isinstance(value, Mapping):
        text = "an object"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """Typed reads of a config's fields; each failure a ConfigError naming file and key.
    A number that is absent or ``null`` is missing (transformers' configuration classes
    treat ``None`` as "use the default": num_key_value_heads, head_dim, n_inner)."""

    def __init__(self, config: Mapping[str, Any], where: str):
        self.config, self.where = config, where

    def _first(self, keys: tuple[str, ...]) -> tuple[str, Any]:
        for key in keys:
            if self.config.get(key) is not None:
                return key, self.config[key]
        return keys[0], _MISSING

    def _missing(self, keys: tuple[str, ...]) -> ConfigError:
        also = f" (or {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else ""
        return ConfigError(f"{self.where}: config is missing the field {keys[0]!r}{also}")

    def int(self, *keys: str, limit: Limit, default: Any = _MISSING) -> int:
        key, value = self._first(keys)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(keys)
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: {key} must be a JSON integer, got {_show(value)}")
        if not limit.lo <= value <= limit.hi:
            raise _out_of_range(self.where, key, value, limit, limit.lo)
        return value

    def bool(self, key: str, default: bool) -> bool:
        """A JSON boolean; ``null`` too is an error (transformers 5's configuration classes
        reject it: ``tie_word_embeddings`` expected bool, got NoneType)."""
        value = self.config.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key} must be true or false, got {_show(value)}")
        return value

    def fraction(self, key: str, default: float) -> float:
        """A probability (dropout): a number in [0, 1]."""
        value = self.config.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{self.where}: {key} must be a number between 0 and 1, got {_show(value)}")
        return float(value)

    def number(self, key: str) -> float | None:
        value = self.config.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.where}: {key} must be a number or null, got {_show(value)}")
        return float(value)

    def text(self, *keys: str, default: str) -> str:
        key, value = self._first(keys)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.where}: {key} must be a non-empty string, got {_show(value)}")
        return value


def _out_of_range(where: str, key: str, value: int, limit: Limit, lo: int) -> ConfigError:
    shown = f"{value:,}" if value.bit_length() <= 64 else _show(value)
    why = f" ({limit.name}: {limit.why})" if value > limit.hi else ""
    return ConfigError(f"{where}: {key} must be between {lo} and {limit.hi:,}, got {shown}{why}")


def check_model_type(config: Mapping[str, Any], where: str) -> str:
    value = config.get("model_type")
    if value is None:
        raise ConfigError(f"{where}: config is missing the field 'model_type'")
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", value):
        raise ConfigError(f"{where}: model_type must be a name like 'llama' (letters, digits, _ and -), "
                          f"got {_show(value)}")
    return value


def check_shapes(where: str, hidden: int, heads: int, kv_heads: int, head_dim_given: bool,
                 experts: int, experts_per_token: int) -> None:
    """Shapes transformers would reject or build wrong: heads split the hidden size unless
    head_dim is given (GPT2Attention and OPTAttention raise otherwise; LlamaAttention uses
    ``head_dim = hidden_size // num_attention_heads``), key/value heads split the heads
    (``repeat_kv`` repeats each num_attention_heads // num_key_value_heads times), and a
    token is routed to at most every expert (``torch.topk(router_logits, top_k)``)."""
    if not head_dim_given and hidden % heads:
        raise ConfigError(f"{where}: {heads} attention heads do not divide the hidden size {hidden}; "
                          f"fix num_attention_heads or give head_dim")
    if heads % kv_heads:
        raise ConfigError(f"{where}: {kv_heads} key/value heads do not divide the {heads} attention heads "
                          f"(num_key_value_heads must divide num_attention_heads)")
    if experts and not 1 <= experts_per_token <= experts:
        raise ConfigError(f"{where}: num_experts_per_tok must be between 1 and num_local_experts ({experts}), "
                          f"got {experts_per_token}")


#: Size-like keys of a config handed to transformers without a formula here, by the limit
#: that bounds them (matched on the key's name, at any depth): the meta-device fallback gets
#: the same limits as the families with a formula.
_FALLBACK_LIMITS = (
    (re.compile(r"layers$"), MAX_LAYERS),
    (re.compile(r"experts"), MAX_EXPERTS),
    (re.compile(r"vocab"), MAX_VOCAB),
    (re.compile(r"heads$|^n_head"), MAX_HEADS),
    (re.compile(r"intermediate|ffn|inner"), MAX_INTERMEDIATE),
    (re.compile(r"position"), MAX_POSITIONS),
    (re.compile(r"^(hidden_size|d_model|n_embd|dim|head_dim|embed_dim)$"), MAX_HIDDEN),
)


def check_fallback_sizes(config: Mapping[str, Any], where: str, path: tuple = ()) -> None:
    """Every integer size-like field, at any depth, within its limit (0 allowed: "none")."""
    for key, value in config.items():
        if isinstance(value, Mapping):
            check_fallback_sizes(value, where, path + (key,))
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        for pattern, limit in _FALLBACK_LIMITS:
            if pattern.search(str(key)):
                if not 0 <= value <= limit.hi:
                    raise _out_of_range(where, ".".join(map(str, path + (key,))), value, limit, 0)
                break


class _TimeUp(BaseException):
    """Raised inside a timed block (a BaseException, so no ``except Exception`` in a library swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float, message: str):
    """Stop the block with :class:`ConfigError` (``message``) after ``seconds`` of wall time.
    Uses SIGALRM, so it times only in the main thread of a POSIX process (elsewhere the block
    runs unlimited, bounded by the size limits); an outer timer is re-armed afterwards."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _TimeUp

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, ring)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _TimeUp:
        raise ConfigError(message) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:  # an outer timer: re-arm it with what is left (at least a tick)
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-3), old_interval)
