"""The sim backend's fidelity: fake tensors must allocate what a real step allocates.

A sim run builds the model on meta, materialises fake CPU tensors (``build.materialize_fake``)
and steps it under ``FakeTensorMode``. Where a library behaves differently on fake tensors
than on real ones, the difference is undone here, inside the run only (context managers
entered around the steps, never left installed).

- Packed sequences. transformers' ``masking_utils.find_packed_sequence_indices`` cannot
  read a fake tensor's values, so ``is_tracing`` (true for fake tensors,
  ``utils/import_utils.py``) makes it return the packed-sequence mask instead of ``None``.
  ``_preprocess_mask_arguments`` then builds a full (b, 1, s, s) mask: sdpa loses
  ``enable_gqa`` (``integrations/sdpa_attention.py:use_gqa_in_sdpa`` needs no mask),
  ``repeat_kv`` copies K and V to every head, and sdpa saves the mask per layer. The
  profiler's batches are synthetic and never packed, so :func:`never_packed` returns
  ``None`` as a real run does, after making the same temporaries a real run makes (the
  position diff, its cumsum and the check on its last column).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def never_packed() -> Iterator[None]:
    """During the block, transformers treats every batch as unpacked, as it does for a real
    (non-fake) batch of unpacked sequences."""
    try:
        from transformers import masking_utils
    except ImportError:  # no transformers: nothing to undo
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:  # a transformers without packed-sequence detection
        yield
        return

    def find_packed_sequence_indices(position_ids):
        mask = original(position_ids)
        if mask is not None:
            (mask[:, -1] == 0).all()  # the check a real batch runs before it returns None
        return None

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original
