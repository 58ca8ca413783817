"""Unpaired preference rows (format unpaired_preference, KTO's {prompt, completion, label}): parsing, rendering
with the real SmolLM2 chat template the way pairs render, limits, splits by prompt, the cache, the config checks
and the preview."""

import pytest

from loraforge.config.data_section import DataConfig
from loraforge.data.build import build_datasets
from loraforge.data.formats import Message, Unpaired, from_preference, from_unpaired_preference
from loraforge.data.render import render_preference, stop_token_ids
from loraforge.errors import DataError
from tests.conftest import write_jsonl

USER = (Message("user", "What is 2 plus 2?"),)


def unpaired_config(*paths, **kw):
    sources = [{"path": str(p), "format": "unpaired_preference"} for p in paths]
    return DataConfig.model_validate({"sources": sources, "cache": False, "val_fraction": 0.0, **kw})


def unpaired_rows(n=6):
    """Each prompt twice: its right answer desirable, a wrong one undesirable."""
    return [row for i in range(n) for row in (
        {"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}.", "label": True},
        {"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i + 1}.", "label": False})]


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 plus 2?", "completion": "4.", "label": True},
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "completion": "4.", "label": True},
    {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "completion": "4.", "label": True},
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
     "completion": [{"role": "assistant", "content": "4."}], "label": True},
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
     "completion": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}],
     "label": True},
])
def test_every_unpaired_shape_gives_the_same_example(row):
    assert from_unpaired_preference(row, "u.jsonl:1") == Unpaired(USER, (Message("assistant", "4."),), True)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "x", "completion": "a"}, r"u.jsonl:7: no 'label' field \(keys: completion, prompt\); "
                                         r"format=unpaired_preference"),
    ({"prompt": "x", "completion": "a", "label": "yes"}, r"u.jsonl:7: field 'label' is 'yes'; write true "
                                                         r"\(a desirable answer\) or false"),
    ({"prompt": "x", "completion": "a", "label": 1}, r"u.jsonl:7: field 'label' is 1; write true"),
    ({"prompt": "x", "completion": "", "label": True}, r"u.jsonl:7: field 'completion' is empty"),
    ({"completion": "a", "label": True}, r"u.jsonl:7: no 'prompt' or 'messages' field"),
    ({"prompt": "x", "chosen": "a", "rejected": "b"}, r"u.jsonl:7: no 'completion' field"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "a"}], "label": False},
     r"u.jsonl:7: field 'completion' must hold the assistant answer only"),
])
def test_bad_unpaired_rows_name_the_row_the_field_and_the_fix(row, expected):
    with pytest.raises(DataError, match=expected):
        from_unpaired_preference(row, "u.jsonl:7")


def test_mapped_fields_are_read(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "u.jsonl", [{"q": f"Question {i}", "a": f"Answer {i}", "good": i % 2 == 0}
                                             for i in range(4)])
    config = DataConfig.model_validate({"sources": [{"path": str(path), "format": "unpaired_preference",
                                                     "fields": {"prompt": "q", "completion": "a", "label": "good"}}],
                                        "cache": False, "val_fraction": 0.0})
    bundle = build_datasets(config, tokenizer, stop_token_ids(tokenizer), 0)
    assert bundle.train["label"] == [True, False, True, False]


def test_an_unpaired_row_renders_as_the_same_answer_of_a_pair_would(tmp_path, tokenizer):
    """The prompt tokens and each answer's tokens are the ones the pair of the same prompt and answers gets."""
    rows = unpaired_rows(3)
    bundle = build_datasets(unpaired_config(write_jsonl(tmp_path / "u.jsonl", rows)), tokenizer,
                            stop_token_ids(tokenizer), 0)
    assert set(bundle.train.column_names) == {"prompt_ids", "completion_ids", "label"}
    assert bundle.train["label"] == [r["label"] for r in rows]
    for i in range(3):
        pair = {"prompt": rows[2 * i]["prompt"], "chosen": rows[2 * i]["completion"],
                "rejected": rows[2 * i + 1]["completion"]}
        prompt, chosen, rejected = render_preference(from_preference(pair, "x"), tokenizer, stop_token_ids(tokenizer))
        assert bundle.train[2 * i]["prompt_ids"] == bundle.train[2 * i + 1]["prompt_ids"] == prompt
        assert (bundle.train[2 * i]["completion_ids"], bundle.train[2 * i + 1]["completion_ids"]) == (chosen, rejected)
        assert tokenizer.decode(chosen).strip().endswith(f"{2 * i}.<|im_end|>"), "the end-of-turn token is trained"
    assert bundle.stats.trainable_tokens == sum(len(a) for a in bundle.train["completion_ids"])
    assert bundle.stats.train_tokens == bundle.stats.trainable_tokens + sum(len(p) for p in bundle.train["prompt_ids"])


def test_limits_cut_and_count_and_drop(tmp_path, tokenizer):
    long = {"prompt": "Tell me about " + "the sea and " * 60, "completion": "Waves. " * 40, "label": True}
    path = write_jsonl(tmp_path / "u.jsonl", [long, *unpaired_rows(2)])
    stops = stop_token_ids(tokenizer)
    cut = build_datasets(unpaired_config(path, max_length=96, max_prompt_length=48, truncation="truncate"),
                         tokenizer, stops, 0)
    assert len(cut.train[0]["prompt_ids"]) == 48 and len(cut.train[0]["prompt_ids"] + cut.train[0]["completion_ids"]) == 96
    assert cut.stats.truncated_prompts == 1 and cut.stats.truncated == 1
    dropped = build_datasets(unpaired_config(path, max_length=96, truncation="drop"), tokenizer, stops, 0)
    assert len(dropped.train) == 4 and dropped.stats.dropped == {"too_long": 1}
    with pytest.raises(DataError, match=rf"{path}:1: prompt and answer \d+ tokens \(data.max_length=96\)"):
        build_datasets(unpaired_config(path, max_length=96, truncation="error"), tokenizer, stops, 0)


def test_rows_of_one_prompt_stay_on_one_side_of_the_split(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i % 10}", "completion": f"Answer {i}", "label": i % 3 == 0} for i in range(60)]
    bundle = build_datasets(unpaired_config(write_jsonl(tmp_path / "u.jsonl", rows), val_fraction=0.2), tokenizer,
                            stop_token_ids(tokenizer), 0)
    train_prompts = {tuple(r["prompt_ids"]) for r in bundle.train}
    val_prompts = {tuple(r["prompt_ids"]) for r in bundle.val}
    assert len(val_prompts) == 2 and len(bundle.val) == 12, "2 of 10 prompts held out, with all 6 rows of each"
    assert not train_prompts & val_prompts


def test_duplicates_differ_by_label_and_the_cache_keeps_rows(tmp_path, tokenizer):
    rows = [*unpaired_rows(3), unpaired_rows(3)[0], {**unpaired_rows(3)[0], "label": False}]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    stops = stop_token_ids(tokenizer)
    config = unpaired_config(path, dedupe=True).model_copy(update={"cache": True})
    first = build_datasets(config, tokenizer, stops, 0, cache_dir=tmp_path / "cache")
    assert len(first.train) == 7 and first.stats.dropped == {"duplicate": 1}, "the same answer labelled both ways stays"
    again = build_datasets(config, tokenizer, stops, 0, cache_dir=tmp_path / "cache")
    assert again.train.to_dict() == first.train.to_dict() and vars(again.stats) == vars(first.stats)


def test_pairs_and_unpaired_rows_are_not_mixed():
    sources = [{"path": "a.jsonl", "format": "preference"}, {"path": "b.jsonl", "format": "unpaired_preference"}]
    with pytest.raises(ValueError, match="sources mix preference pairs with unpaired_preference rows; write each "
                                         "pair as two unpaired rows"):
        DataConfig.model_validate({"sources": sources})
