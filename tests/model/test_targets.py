"""The modules a config names for LoRA, checked against a model folder's weight names (config validate, and train
before it loads anything) as against the loaded model (train)."""

import json
import shutil

import pytest

from loraforge.model.adapters import loaded_modules
from loraforge.model.load import load_model
from loraforge.model.targets import modules_on_disk, target_problems


@pytest.mark.parametrize("model", ["tiny", "builtin"])
def test_the_weight_names_give_the_modules_the_loaded_model_has(model, tiny_model_dir, smollm_path):
    folder = tiny_model_dir if model == "tiny" else smollm_path
    on_disk, loaded = modules_on_disk(folder), loaded_modules(load_model(str(folder)))
    assert on_disk.linear == loaded.linear and on_disk.tied_head == loaded.tied_head
    leaves = {name for name in loaded.names if name and not any(other.startswith(name + ".") for other in loaded.names)}
    assert {n for n in leaves if not n.endswith(("rotary_emb", "act_fn"))} <= on_disk.names <= loaded.names
    for wanted in (["q_proj"], ["foo", "v_proj"], ["lm_head"], "all-linear"):
        for saved in (None, ["lm_head"], ["embed_tokens", "bar"]):
            assert target_problems(on_disk, wanted, saved) == target_problems(loaded, wanted, saved), (wanted, saved)


def test_a_classification_run_has_a_score_head_the_files_do_not_hold(tiny_model_dir):
    assert target_problems(modules_on_disk(tiny_model_dir, "classification"), ["q_proj"], ["score"]) == []
    assert target_problems(modules_on_disk(tiny_model_dir), ["q_proj"], ["score"]) != []


def test_sharded_weights_are_read_through_their_index(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "sharded")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    names = list(modules_on_disk(tiny_model_dir).names)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"{name}.weight": "model-00001-of-00001.safetensors" for name in names}}))
    assert modules_on_disk(folder).names == modules_on_disk(tiny_model_dir).names


def test_a_folder_without_readable_weights_is_left_to_loading(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "damaged")
    (folder / "model.safetensors").write_bytes(b"\xff" * 16)
    assert modules_on_disk(folder) is None
    (folder / "model.safetensors").unlink()
    assert modules_on_disk(folder) is None
