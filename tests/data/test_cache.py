"""Tokenized data is reused only when nothing that changes the tokens has changed."""

import hashlib
import logging
import os

import pytest

from loraforge.config.data_section import DataConfig
from loraforge.data.build import build_datasets
from loraforge.data.render import stop_token_ids
from loraforge.training.manifest import data_fingerprints
from tests.conftest import write_jsonl


@pytest.fixture
def setup(tmp_path, tokenizer, chat_rows):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows)

    def run(caplog, tok=tokenizer, seed=0, **data):
        config = DataConfig.model_validate({"sources": [{"path": str(path)}], "val_fraction": 0.2, **data})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loraforge"):
            bundle = build_datasets(config, tok, stop_token_ids(tok), seed, cache_dir=tmp_path / "cache")
        hit = any("loaded from cache" in r.message for r in caplog.records)
        return bundle, hit

    return run, path


def test_second_run_skips_tokenization_and_gives_the_same_data(setup, caplog):
    run, _ = setup
    first, hit = run(caplog)
    assert not hit
    second, hit = run(caplog)
    assert hit
    assert second.train["input_ids"] == first.train["input_ids"]
    assert second.train["labels"] == first.train["labels"]
    assert second.val["input_ids"] == first.val["input_ids"]
    assert second.val_prompts == first.val_prompts
    assert second.stats == first.stats


@pytest.mark.parametrize(
    "change",
    ["file", "max_length", "masking", "system_prompt", "seed", "template"],
)
def test_any_input_change_retokenizes(setup, caplog, tokenizer, change):
    import copy

    run, path = setup
    run(caplog)
    kwargs = {}
    if change == "file":
        path.write_text(path.read_text() + '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    elif change == "max_length":
        kwargs["max_length"] = 256
    elif change == "masking":
        kwargs["masking"] = "all"
    elif change == "system_prompt":
        kwargs["system_prompt"] = "Be brief."
    elif change == "seed":
        kwargs["seed"] = 1
    elif change == "template":
        other = copy.deepcopy(tokenizer)
        other.chat_template = tokenizer.chat_template.replace("helpful AI assistant", "terse assistant")
        kwargs["tok"] = other
    _, hit = run(caplog, **kwargs)
    assert not hit, f"changing {change} must re-tokenize"


def test_cache_off(setup, caplog, tmp_path):
    run, _ = setup
    run(caplog, cache=False)
    _, hit = run(caplog, cache=False)
    assert not hit and not (tmp_path / "cache").exists()


def test_a_data_file_is_read_for_its_hash_once_per_process(setup, caplog, hashed):
    run, path = setup
    run(caplog)
    _, hit = run(caplog)
    fingerprints = data_fingerprints(DataConfig.model_validate({"sources": [{"path": str(path)}]}).sources)
    assert hit and fingerprints == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}
    assert hashed[path.resolve()] == 1


def test_a_data_file_changed_on_disk_is_hashed_again(tmp_path, hashed):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n', encoding="utf-8")
    sources = DataConfig.model_validate({"sources": [{"path": str(path)}]}).sources
    before = data_fingerprints(sources)[str(path)]
    mtime = path.stat().st_mtime_ns
    path.write_text('{"text": "two"}\n', encoding="utf-8")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    after = data_fingerprints(sources)[str(path)]
    assert data_fingerprints(sources)[str(path)] == after == hashlib.sha256(path.read_bytes()).hexdigest() != before
    assert hashed[path.resolve()] == 2, "hashed as first read and once changed, not when read again unchanged"


@pytest.mark.parametrize("damage", ["arrow cut short", "bundle.json cut short"])
def test_a_damaged_cache_entry_is_tokenized_again_in_its_place(setup, caplog, tmp_path, damage):
    """A cut-short entry (a full disk, a copy stopped midway) ended train with a pyarrow or JSON traceback that did
    not name the folder to delete."""
    run, _ = setup
    first, _ = run(caplog)
    (entry,) = (tmp_path / "cache").iterdir()
    if damage == "arrow cut short":
        arrow = next((entry / "train").glob("*.arrow"))
        with arrow.open("r+b") as fh:
            fh.truncate(100)
    else:
        (entry / "bundle.json").write_text('{"val_prompts": [', encoding="utf-8")
    again, hit = run(caplog)
    assert not hit and again.train["input_ids"] == first.train["input_ids"]
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno == logging.WARNING] == [
        f"tokenized data cache entry {entry} cannot be read"]
    third, hit = run(caplog)
    assert hit and third.train["input_ids"] == first.train["input_ids"], "the entry was written again, whole"


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(setup, caplog, tmp_path):
    """A read-only or full LORAFORGE_HOME ended every train with an OSError traceback (the cache is on by default)."""
    run, _ = setup
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    bundle, hit = run(caplog)
    assert not hit and len(bundle.train) > 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"the tokenized data cannot be cached in {tmp_path / 'cache'} (")
    assert warning.endswith("so the next run tokenizes it again; free space there, set LORAFORGE_HOME to a writable "
                            "folder, or set data.cache: false")
