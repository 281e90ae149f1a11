"""The model of a config without a formula, built on the meta device with transformers (no
memory used): what the estimator counts when its family is not in the registry."""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from typing import Any

from ..configcheck import (
    META_BUILD_TIMEOUT_S,
    ConfigError,
    check_fallback_sizes,
    strip_code_keys,
    time_limit,
    where_of,
)

#: The longest message about an unknown model_type (it names the type, the file and close
#: matches): the CLI's whole line, after "vramlab: error: " (16), fits in 200 characters.
UNKNOWN_TYPE_MESSAGE_CHARS = 200 - len("vramlab: error: ")


def check_known_type(model_type: str, where: str, families: tuple[str, ...], known: Mapping[str, Any],
                     causal: Mapping[str, Any], version: str) -> None:
    """A model_type without a formula must be a causal LM transformers knows; the error
    fits in :data:`UNKNOWN_TYPE_MESSAGE_CHARS` characters (it does not list all 800 types)."""
    if model_type in causal:
        return
    short = where if len(where) <= 40 else "..." + where[-37:]
    start = f"transformers cannot build model_type {model_type!r} of {short}: "
    if model_type in known:
        message = start + f"it is no causal LM in transformers {version}"
    else:
        names = list(dict.fromkeys([*families, *causal]))
        close = difflib.get_close_matches(model_type.lower(), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        message = start + f"unknown to transformers {version}, and no formula here{hint}"
    raise ConfigError(message if len(message) <= UNKNOWN_TYPE_MESSAGE_CHARS
                      else message[:UNKNOWN_TYPE_MESSAGE_CHARS - 3] + "...")


def build_meta_model(spec):
    """The model of a config without a formula, built on the meta device (no memory), under
    the same limits as the families with one (configcheck.check_fallback_sizes) and a time
    limit (META_BUILD_TIMEOUT_S). Keys that load code or kernels never reach transformers."""
    where = where_of(spec.source, spec.name)
    config, _ = strip_code_keys(spec.config)
    check_fallback_sizes(config, where)
    from . import registered_types
    try:
        import torch
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ValueError(f"model_type {spec.model_type!r} needs transformers to be counted ({exc})") from None
    check_known_type(spec.model_type, where, registered_types(), CONFIG_MAPPING_NAMES,
                     MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, transformers.__version__)
    verbosity = transformers.logging.get_verbosity()
    try:
        # a config of another family (a key this type's config class cannot set, a deprecated
        # name) makes transformers log and warn: the error below is the one sentence said
        transformers.logging.set_verbosity(transformers.logging.CRITICAL)
        with warnings.catch_warnings(), time_limit(
                META_BUILD_TIMEOUT_S, f"building model_type {spec.model_type!r} of {where} on the meta "
                                      f"device took over {META_BUILD_TIMEOUT_S:.0f} s"):
            warnings.simplefilter("ignore")
            cfg = transformers.AutoConfig.for_model(**config)
            with torch.device("meta"):
                return transformers.AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers rejects, in any of its ways
        message = " ".join(str(exc).split())
        if len(message) > 120:
            message = message[:117] + "..."
        raise ConfigError(f"transformers cannot build model_type {spec.model_type!r} from {where}: "
                          f"{type(exc).__name__}: {message}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


_LINEARS: dict = {}


def meta_linears(spec) -> tuple[int, int, int]:
    """(weight elements, output rows, biases) of the modules bitsandbytes replaces in the
    meta-device build: every module whose type is exactly nn.Linear, and GPT-2's Conv1D
    (transformers 5.24 integrations/bitsandbytes.py:189 ``isinstance(module, Conv1D) or
    type(module) is nn.Linear``), but the output embedding (``get_keys_to_not_convert``:
    the output head); fused 3-D expert parameters and MoE routers of their own class stay as
    they are. Memoised per spec (a build takes a second or two)."""
    found = _LINEARS.get(spec)
    if found is None:
        import torch.nn as nn
        from transformers.pytorch_utils import Conv1D
        model = build_meta_model(spec)
        head = model.get_output_embeddings()
        weights = rows = biases = 0
        for module in model.modules():
            if module is head or not (type(module) is nn.Linear or isinstance(module, Conv1D)):
                continue
            weights += module.weight.numel()
            rows += module.nf if isinstance(module, Conv1D) else module.out_features
            biases += module.bias.numel() if module.bias is not None else 0
        found = _LINEARS[spec] = (weights, rows, biases)
    return found
