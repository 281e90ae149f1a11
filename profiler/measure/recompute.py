"""A hook around activation checkpointing's recomputation.

Non-reentrant ``torch.utils.checkpoint`` reruns a layer's forward during backward inside
``with _recomputation_hook(...)`` in its unpack hook, and may stop it early by raising
``_StopRecomputationError`` (torch/utils/checkpoint.py); the context manager's
``__enter__`` and ``__exit__`` run however the recomputation ends. Python modes active
where ``backward()`` was called are not active there, so whatever a run changes for its
forward (the tracker's category, the sim's CUDA autocast policy) must be re-entered for
the recomputation: :func:`around_recomputation` does that, installed and removed in a pair.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def around_recomputation(enter: Callable[[], None], leave: Callable[[], None]) -> Iterator[None]:
    """Call ``enter()`` as each checkpointed recomputation starts and ``leave()`` as it ends."""
    from torch.utils import checkpoint
    cls = getattr(checkpoint, "_recomputation_hook", None)
    if cls is None:  # a torch without it: nothing to hook
        yield
        return
    own = {name: cls.__dict__[name] for name in ("__enter__", "__exit__") if name in cls.__dict__}
    original_enter, original_exit = cls.__enter__, cls.__exit__

    def hooked_enter(self):
        enter()
        return original_enter(self)

    def hooked_exit(self, *exc):
        try:
            return original_exit(self, *exc)
        finally:
            leave()

    cls.__enter__, cls.__exit__ = hooked_enter, hooked_exit
    try:
        yield
    finally:
        for name in ("__enter__", "__exit__"):
            if name in own:
                setattr(cls, name, own[name])
            else:
                delattr(cls, name)
