"""How a model argument is resolved: a path is a path (never a shipped file it happens to
name), a missing path says so, a checkpoint's config.json is titled by its folder."""
from __future__ import annotations

import json

import pytest

from estimator.modelspec import MODELS_DIR, load_model


def _config(name: str) -> dict:
    return json.loads((MODELS_DIR / f"{name}.json").read_text())


def test_a_folder_is_read_not_the_json_file_beside_it(tmp_path):
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text(json.dumps(_config("gpt2")))
    (tmp_path / "mymodel.json").write_text(json.dumps(_config("opt-125m")))
    assert load_model(str(tmp_path / "mymodel")).model_type == "gpt2"
    assert load_model(str(tmp_path / "mymodel.json")).model_type == "opt"


def test_a_checkpoint_config_is_titled_by_its_folder(tmp_path):
    (tmp_path / "qwen-ish").mkdir()
    (tmp_path / "qwen-ish" / "config.json").write_text(json.dumps(_config("qwen2.5-0.5b")))
    assert load_model(str(tmp_path / "qwen-ish" / "config.json")).name == "qwen-ish"
    (tmp_path / "other.json").write_text(json.dumps(_config("gpt2")))
    assert load_model(str(tmp_path / "other.json")).name == "other"


@pytest.mark.parametrize("arg", ["./missing.json", "/no/such/folder", "a/b/c", "~/nope.json"])
def test_a_missing_path_is_reported_as_missing(arg):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_model(arg)


def test_a_special_file_is_not_a_config():
    with pytest.raises(ValueError, match="is not a config.json file or a folder holding one"):
        load_model("/dev/null")


def test_a_bare_unknown_name_still_suggests_shipped_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt3'.*did you mean gpt2"):
        load_model("gpt3")
