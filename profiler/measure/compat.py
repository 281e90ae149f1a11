"""Keyword names that changed between transformers releases, so the harness measures the
installed version's semantics (estimator/versions.py) instead of failing on a name.

Read from the released wheels: ``from_config(..., dtype=)`` from 4.56 (``torch_dtype``
before; 4.56.0 modeling_utils.py); ``logits_to_keep`` from 4.49 (4.49.0
models/llama/modeling_llama.py:800), ``num_logits_to_keep`` in 4.45-4.48 (4.45.0
models/llama/modeling_llama.py:1150), neither before (every position's logits)."""
from __future__ import annotations

from functools import lru_cache

from estimator.versions import parse_version


@lru_cache(maxsize=1)
def _transformers() -> tuple[int, ...]:
    import transformers
    return parse_version(transformers.__version__)


def dtype_kwargs(dtype) -> dict:
    """The ``from_config`` keyword that sets the parameters' dtype."""
    return {"dtype": dtype} if _transformers() >= (4, 56) else {"torch_dtype": dtype}


def keep_last_logits(model=None) -> dict:
    """The forward keyword that computes only the last position's logits, passed as
    ``generate`` passes it: only to a model whose forward takes it (4.49.0
    generation/utils.py ``_supports_logits_to_keep``: ``inspect.signature(self.forward)``).
    GPT-2 takes it from 4.53, OPT from 5.0, the Llama family from 4.45 (the families'
    prefill_full_logits switches, estimator/archs); without it the prefill computes every position's."""
    import inspect

    if _transformers() >= (4, 49):
        name = "logits_to_keep"
    elif _transformers() >= (4, 45):
        name = "num_logits_to_keep"
    else:
        return {}
    if model is not None:
        forward = getattr(model, "forward", None)
        try:
            if forward is not None and name not in inspect.signature(forward).parameters:
                return {}
        except (TypeError, ValueError):  # a forward without a signature: pass it, as before
            pass
    return {name: 1}
