"""The architecture registry (estimator/archs): every family's inventory against its counts,
traits resolved per version and printed with the estimate, the registry in messages."""
from __future__ import annotations

import json

import pytest

from estimator.archs import ARCHS, QKV, Softmax, arch_of, inventory_of, registered_types, traits
from estimator.modelspec import load_model, registry_names
from estimator.params import count_params, layer_linears, param_tensor_sizes
from estimator.setup import Setup


@pytest.mark.parametrize("name", registry_names())
def test_every_shipped_model_has_a_family_and_one_inventory(name):
    spec = load_model(name)
    assert spec.model_type in ARCHS and arch_of(spec).exact
    inv = inventory_of(spec)
    assert inv.total == count_params(spec).total == sum(param_tensor_sizes(spec))
    root, layer = inv.dim0_shapes()
    # a family's first dense layers (Inventory.dense_layer) and layers of further kinds (Inventory.other)
    # beside the repeated layer dim0_shapes describes
    dense = inv.dense_layers * sum(t.elems for t in inv.dense_layer) + sum(n * sum(t.elems for t in ts)
                                                                           for ts, n in inv.other)
    repeated = inv.repeated_layers
    assert sum(r * c for r, c in root) + repeated * sum(r * c for r, c in layer) + dense == inv.total
    assert {t.name.split(".")[0] for t in inv.layer} >= {lin.name for lin in layer_linears(spec)}


def test_registry_is_sorted_and_lists_the_families():
    types = registered_types()
    assert list(types) == sorted(types)
    assert {"llama", "gpt2", "opt", "gpt_neox", "biogpt", "phi3", "gemma2", "mixtral", "qwen2"} <= set(types)


def test_switches_resolve_per_version():
    neox = load_model("pythia-70m")
    assert traits(neox, Setup(versions="transformers=4.48.3")).eager_softmax is Softmax.COMPUTE
    assert traits(neox, Setup(versions="transformers=4.49.0")).eager_softmax is Softmax.UPCAST
    assert traits(load_model("gpt2"), Setup()).qkv is QKV.FUSED_VIEWS


def test_estimate_json_prints_the_traits_it_assumed(cli):
    out = cli("estimate", "pythia-70m", "--json", "--versions", "transformers=4.44.2")
    assert out.code == 0, out.err
    assumed = json.loads(out.out)["assumed_versions"]
    assert assumed["traits"]["rotary_fp32"] is True and assumed["traits"]["eager_softmax"] == "compute"
    assert assumed["traits"]["family"] == "gpt_neox" and assumed["versions"]["transformers"] == "4.44.2"
