"""The usage examples in the docstrings run (doctest), so they cannot go stale."""
from __future__ import annotations

import doctest

import pytest

import estimator.archs
import estimator.estimate
import profiler.measure.run


@pytest.mark.parametrize("module", [estimator.archs, estimator.estimate, profiler.measure.run],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
