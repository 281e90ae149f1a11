"""Architecture knowledge lives in estimator/archs/ (and the config reading in modelspec.py):
no other estimator module compares a model type, a family or an activation name, names a
registered model type, or reads a spec's raw config. A term that needs to know something
about an architecture reads its traits (estimator.archs.traits)."""
from __future__ import annotations

import ast
from pathlib import Path

from estimator.archs import registered_types

ESTIMATOR = Path(__file__).resolve().parents[1] / "estimator"
ALLOWED = {ESTIMATOR / "modelspec.py"}
#: names whose comparison means "which architecture is this"
ARCH_NAMES = {"model_type", "family", "hidden_act"}


def _modules():
    for path in sorted(ESTIMATOR.rglob("*.py")):
        if "archs" in path.relative_to(ESTIMATOR).parts or path in ALLOWED:
            continue
        yield path


def _names(node) -> set[str]:
    if isinstance(node, ast.Attribute):
        return {node.attr}
    if isinstance(node, ast.Name):
        return {node.id}
    return set()


def violations(source: str, registered: set[str]) -> list[str]:
    """Every place in ``source`` that knows an architecture by name (line: what)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            hit = set().union(*(_names(x) for x in operands)) & ARCH_NAMES
            if hit:
                out.append(f"{node.lineno}: compares {sorted(hit)[0]}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in registered:
            out.append(f"{node.lineno}: names model type {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "config" and _names(node.value) & {"spec"}:
            out.append(f"{node.lineno}: reads spec.config")
    return out


def test_no_module_outside_archs_knows_an_architecture_by_name():
    registered = set(registered_types())
    found = {str(p.relative_to(ESTIMATOR)): v for p in _modules() if (v := violations(p.read_text(), registered))}
    assert not found, found


def test_the_guard_catches_each_kind():
    registered = set(registered_types())
    assert violations('if spec.model_type == "x": pass', registered) == ["1: compares model_type"]
    assert violations('y = spec.family in ("a",)', registered) == ["1: compares family"]
    assert violations('y = hidden_act != "gelu"', registered) == ["1: compares hidden_act"]
    assert violations('y = {"gpt2": 1}', registered) == ["1: names model type 'gpt2'"]
    assert violations('y = spec.config.get("rotary_pct")', registered) == ["1: reads spec.config"]
    assert violations('y = traits(spec, setup).qkv', registered) == []
