"""How this harness runs a case, in the terms of a Setup (torch-free: the analysis imports it)."""
from __future__ import annotations

from estimator.setup import Load, Setup


def harness_setup(setup: Setup, backend: str = "cuda") -> Setup:
    """The setup as this harness runs it, for the estimate put beside it: a training loop
    that empties the cache before every step after the first (steps._train_steps; an
    evaluation or a generation never empties it), and on cuda the model built from its
    config on the device (``Load.CONFIG``: build.build_model), where a tied head's own
    weight is made and dropped; the sim builds on the meta device and materialises each
    parameter once (build.materialize_fake), as a pretrained load places it."""
    load = Load.CONFIG if backend == "cuda" else Load.PRETRAINED
    return setup.replace(load=load, empty_cache_steps=1 if setup.training else 0)
