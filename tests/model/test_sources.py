"""model.name as a path or a hub id: a missing folder is said to be one, and a hub id that can be neither found in
the local hub cache nor fetched is refused at once, where transformers would retry for half a minute."""

import json
import logging
import shutil

import huggingface_hub.constants
import pytest

from loraforge import rundir
from loraforge.cli import main
from loraforge.config import load_config
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


@pytest.mark.parametrize("name", ["./models/tiny", "models/tiny"])
def test_a_run_takes_its_relative_base_from_where_it_trained_or_from_here_once_that_folder_is_gone(
        name, tiny_model_dir, tmp_path, monkeypatch, caplog):
    """One rule however the name is written: from the folder the run trained in (manifest.json's cwd) while it is
    there, else from the current one with a warning naming both. Once the project moved, ./models/tiny was looked
    for in the old folder ("folder /old/models/tiny not found (cwd is /new)") and models/tiny taken from here
    without a word."""
    trained_in, here, run = tmp_path / "project", tmp_path / "here", tmp_path / "run"
    for folder in (trained_in, here):
        shutil.copytree(tiny_model_dir, folder / "models" / "tiny")
    run.mkdir()
    (run / rundir.MANIFEST).write_text(json.dumps({"cwd": str(trained_in)}))
    config = load_config(write_tiny_config(tmp_path, name, "{max_steps: 1}"))
    monkeypatch.chdir(here)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        assert resolve_model(rundir.base_location(run, config)) == str(trained_in / "models" / "tiny")
        assert not caplog.messages
        trained_in.rename(tmp_path / "moved")
        assert resolve_model(rundir.base_location(run, config)) == str(here / "models" / "tiny")
    assert caplog.messages == [f"model.name {name}: {trained_in}, the folder it was given in (the run trained there), "
                               "is gone (moved, renamed, or the run copied from another machine); taking it from the "
                               f"current folder, {here}"]


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
