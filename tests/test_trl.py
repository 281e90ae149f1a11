"""TRL's trainers (issue 24): the optional extra imports beside the installed transformers and
peft; the trainer tests below skip, saying why, without it."""
from __future__ import annotations

import pytest

trl = pytest.importorskip("trl", reason="trl is not installed: pip install -e '.[trl]' (the test extra has it)")


def test_trl_imports_with_the_installed_transformers_and_peft():
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    major, minor = (int(x) for x in trl.__version__.split(".")[:2])
    assert (major, minor) == (1, 16), f"modelled from trl 1.16's source; installed {trl.__version__}"
