"""The architecture registry: every family the estimator has a formula for, one module each.

``ARCHS`` maps a config's ``model_type`` to its :class:`~estimator.archs.base.Arch`; the
memory terms ask :func:`traits` (resolved for the setup's library versions) and
:func:`arch_of` (the family's inventory and hooks), never a ``model_type``. A module here
registers its families by defining ``ARCHS = (Family(), ...)``; this package finds them
(``pkgutil``), so adding a family touches its module, its shipped config and its test.

    >>> from estimator.modelspec import load_model
    >>> from estimator.setup import Setup
    >>> traits(load_model("gpt2"), Setup()).qkv
    <QKV.FUSED_VIEWS: 'fused-views'>
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from .base import MLP, QKV, Arch, Inventory, Linear, Norm, QKNorm, Router, Softmax, Switch, Tensor, Traits, inventory
from .llama import Fallback

__all__ = ["ARCHS", "FALLBACK", "MLP", "QKV", "Arch", "Inventory", "Linear", "Norm", "QKNorm", "Router", "Softmax",
           "Switch", "Tensor", "Traits", "arch_for_type", "arch_of", "inventory_of", "registered_types", "traits"]


def _discover() -> dict[str, Arch]:
    found: dict[str, Arch] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for arch in getattr(module, "ARCHS", ()):
            for model_type in arch.model_types:
                if model_type in found:
                    raise RuntimeError(f"model_type {model_type!r} registered twice ({info.name})")
                found[model_type] = arch
    return dict(sorted(found.items()))


#: model_type -> the family that reads it
ARCHS: dict[str, Arch] = _discover()
#: what a model type outside the registry gets
FALLBACK: Arch = Fallback()


def registered_types() -> tuple[str, ...]:
    """The model types with a formula, sorted (what messages and ``--help`` list)."""
    return tuple(ARCHS)


def arch_for_type(model_type: str) -> Arch:
    return ARCHS.get(model_type, FALLBACK)


def arch_of(spec) -> Arch:
    """The family of a ModelSpec."""
    return ARCHS.get(spec.model_type, FALLBACK)


def inventory_of(spec) -> Inventory:
    """Every parameter tensor of ``spec`` (estimator/archs/base.py inventory)."""
    return inventory(arch_of(spec), spec)


@lru_cache(maxsize=1024)
def _traits(spec, semantics) -> Traits:
    return arch_of(spec).traits(spec, semantics)


def traits(spec, setup) -> Traits:
    """The traits of ``spec`` under the library versions ``setup`` assumes (a Setup, or a
    :class:`~estimator.versions.Semantics`)."""
    semantics = getattr(setup, "semantics", setup)
    return _traits(spec, semantics)
