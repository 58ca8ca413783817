"""model.name as a path or a hub id: a missing folder is said to be one, and a hub id that can be neither found in
the local hub cache nor fetched is refused at once, where transformers would retry for half a minute."""

import logging
import shutil

import huggingface_hub.constants
import pytest

from loraforge.cli import main
from loraforge.errors import ModelError
from loraforge.model.load import load_model_config
from loraforge.model.sources import check_model_name, resolve_model
from tests.conftest import write_tiny_config

def test_a_missing_folder_under_a_folder_that_is_here_is_a_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ModelError, match=rf"^model.name: folder runs/merged not found \(cwd is {tmp_path}\)"):
        check_model_name("runs/merged")
    check_model_name("Qwen/Qwen2-1.5B")  # no Qwen folder here: a hub id


def test_an_uncached_hub_id_without_a_hub_fails_at_once_in_one_line(tiny_model_dir, no_hub, tmp_path, capsys, caplog):
    config = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1}")
    with caplog.at_level(logging.INFO, logger="huggingface_hub"):
        assert main(["data", "preview", str(config), "model.name=Qwen/Qwen2-1.5B"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: model.name: Qwen/Qwen2-1.5B is not in the local hub cache and the hub cannot be reached "
                   "([Errno 111] Connection refused); give a built-in name (smollm2-135m-instruct), a folder written "
                   "by save_pretrained, or a hub id (owner/name) while online")
    assert not [r.getMessage() for r in caplog.records if "Retry" in r.getMessage()], "asked the hub once"


def test_an_uncached_hub_id_with_hf_hub_offline_says_so(no_hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"^model.name: Qwen/Qwen2-1.5B is not in the local hub cache and "
                                         r"HF_HUB_OFFLINE is set; give .* while online$"):
        resolve_model("Qwen/Qwen2-1.5B")


def test_a_cached_hub_id_loads_without_the_hub(tiny_model_dir, no_hub):
    """Laid out as huggingface_hub caches a download: refs/main names the snapshot that holds the files."""
    commit = "0" * 40
    repo = no_hub / "models--owner--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = resolve_model("owner/tiny-llama")
    assert path == "owner/tiny-llama"
    assert load_model_config(path).num_hidden_layers == 2
