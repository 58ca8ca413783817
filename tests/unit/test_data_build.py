import json
from pathlib import Path

import pytest

from loraforge.config.schema import DataConfig
from loraforge.data.build import build_datasets, load_conversations, read_jsonl, split
from loraforge.data.render import IGNORE, stop_token_ids
from loraforge.errors import DataError
from tests.conftest import ROOT, write_jsonl


def data_config(path, **kw):
    return DataConfig.model_validate({"sources": [{"path": str(path), "format": kw.pop("format", "messages")}], **kw})


def test_read_jsonl_skips_blank_lines_and_numbers_real_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"a": 1}', '{"a": 2'])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(read_jsonl(path))


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object per line, got list"):
        list(read_jsonl(path))


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data file not found.*data.sources\[\]\.path"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_empty_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [""])
    with pytest.raises(DataError, match="no rows"):
        load_conversations(data_config(path).sources, None)


def test_wrong_format_error_names_source_line_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError) as info:
        load_conversations(data_config(path).sources, None)
    message = str(info.value)
    assert f"{path}:1: no 'messages' field (keys: instruction, output)" in message
    assert "data.sources[0], format=messages" in message


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val = split(items, 0.1, seed=42)
    assert len(val) == 10 and sorted(train + val) == items
    assert split(items, 0.1, seed=42) == (train, val)
    assert split(items, 0.1, seed=43)[1] != val
    assert split(items, 0.0, seed=1) == (items, [])
    assert len(split(items[:3], 0.01, seed=1)[1]) == 1, "a non-zero fraction holds out at least one row"


def test_build_drops_and_counts_overlong_samples(tmp_path, tokenizer, chat_rows):
    rows = chat_rows + [{"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_datasets(data_config(path, max_length=128, val_fraction=0.0), tokenizer, stop_token_ids(tokenizer), 0)
    assert bundle.stats.rows_read == 25
    assert bundle.stats.dropped_too_long == 1
    assert bundle.stats.train_rows == 24 and bundle.val is None
    assert all(len(ids) <= 128 for ids in bundle.train["input_ids"])
    assert 0 < bundle.stats.trainable_tokens < bundle.stats.train_tokens


def test_all_rows_too_long_is_an_error(tmp_path, tokenizer, chat_rows):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    with pytest.raises(DataError, match="raise data.max_length"):
        build_datasets(data_config(path, max_length=8, val_fraction=0.0), tokenizer, stop_token_ids(tokenizer), 0)


def test_system_prompt_from_config_reaches_the_tokens(tmp_path, tokenizer, chat_rows):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    bundle = build_datasets(
        data_config(path, system_prompt="Reply with digits.", val_fraction=0.0), tokenizer, stop_token_ids(tokenizer), 0
    )
    assert "Reply with digits." in tokenizer.decode(bundle.train["input_ids"][0])


def test_collator_pads_to_longest_and_keeps_eos_labels(tmp_path, tokenizer, chat_rows):
    """pad id == EOS id for SmolLM2: padding must be masked by position, never by id."""
    from transformers import DataCollatorForSeq2Seq

    rows = chat_rows[:2] + [{"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "y"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    bundle = build_datasets(data_config(path, val_fraction=0.0), tokenizer, stop_token_ids(tokenizer), 0)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    features = [bundle.train[i] for i in range(3)]
    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (3, longest), "padded to the longest in the batch, not max_length"
    for row, feature in zip(range(3), features):
        n = len(feature["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert batch["labels"][row, :n].tolist() == feature["labels"]
        assert (batch["labels"][row] == tokenizer.eos_token_id).sum() == 1, "the assistant EOS stays trained"


def test_bundled_data_is_reproducible_from_its_source(tmp_path):
    pytest.importorskip("chatterbot_corpus", reason="chatterbot-corpus is a dev dependency")
    import runpy

    script = runpy.run_path(str(ROOT / "scripts" / "build_chatterbot_data.py"))
    out = tmp_path / "rebuilt.jsonl"
    script["main"](str(out))
    assert out.read_bytes() == (ROOT / "data" / "chatterbot_en.jsonl").read_bytes()


def test_bundled_data_parses_as_messages():
    path = ROOT / "data" / "chatterbot_en.jsonl"
    conversations, counts = load_conversations(data_config(path).sources, None)
    assert counts[str(path)] == len(conversations) > 2000
    assert all(c.messages[-1].role == "assistant" for c in conversations)
