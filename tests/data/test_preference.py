"""Preference rows (format preference): parsing, rendering with the real SmolLM2 chat template, length limits,
the checks that refuse pairs that teach nothing or do not share a prompt, and the bundled pairs."""

import json

import pytest

from loraforge.config.data_section import DataConfig
from loraforge.data.build import build_datasets
from loraforge.data.formats import Message, Preference, from_preference
from loraforge.data.render import _chat_ids, render_preference, stop_token_ids
from loraforge.errors import DataError
from tests.conftest import ROOT, write_jsonl

USER = (Message("user", "What is 2 plus 2?"),)


def pairs_config(*paths, **kw):
    sources = [{"path": str(p), "format": "preference", **kw.pop("source", {})} for p in paths]
    return DataConfig.model_validate({"sources": sources, "cache": False, "val_fraction": 0.0, **kw})


def pair_rows(n=6):
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(n)]


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."},
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "chosen": "4.", "rejected": "5."},
    {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "chosen": "4.", "rejected": "5."},
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
     "chosen": [{"role": "assistant", "content": "4."}], "rejected": [{"role": "assistant", "content": "5."}]},
    # Answers given as whole conversations (prompt included), as some datasets store them.
    {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
     "chosen": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}],
     "rejected": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "5."}]},
])
def test_every_preference_shape_gives_the_same_pair(row):
    assert from_preference(row, "p.jsonl:1") == Preference(USER, (Message("assistant", "4."),),
                                                           (Message("assistant", "5."),))


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, r"p.jsonl:4: chosen and rejected are the same answer"),
    ({"prompt": "x", "chosen": "a"}, r"p.jsonl:4: no 'rejected' field"),
    ({"chosen": "a", "rejected": "b"}, r"p.jsonl:4: no 'prompt' or 'messages' field"),
    ({"prompt": "x", "chosen": "", "rejected": "b"}, r"p.jsonl:4: field 'chosen' is empty"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, r"p.jsonl:4: field 'chosen' is int, expected text or a list"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, r"p.jsonl:4: field 'prompt' must end on a user turn"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"p.jsonl:4: field 'chosen' must hold the assistant answer only"),
])
def test_bad_preference_rows_name_the_row_and_the_fix(row, expected):
    with pytest.raises(DataError, match=expected):
        from_preference(row, "p.jsonl:4")


def test_rendered_pair_is_the_chat_as_the_template_writes_it(tokenizer):
    stops = stop_token_ids(tokenizer)
    pair = from_preference({"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "Five."}, "p.jsonl:1")
    prompt, chosen, rejected = render_preference(pair, tokenizer, stops)
    full_chosen = _chat_ids(tokenizer, (*pair.prompt, *pair.chosen), add_generation_prompt=False)
    assert prompt + chosen == full_chosen[: len(prompt) + len(chosen)], "one prompt, then the answer"
    assert prompt == _chat_ids(tokenizer, pair.prompt, add_generation_prompt=True), "the prompt a chat would send"
    assert chosen[-1] in stops and rejected[-1] in stops, "each answer is trained through its end-of-turn token"
    assert tokenizer.decode(chosen).startswith("4.") and tokenizer.decode(rejected).startswith("Five.")


def test_a_template_that_renders_the_prompt_differently_once_answered_is_refused(tmp_path, smollm_path):
    from loraforge.model.load import load_tokenizer

    template = ("{% for m in messages %}{% if m.role == 'user' and add_generation_prompt %}Q: {{ m.content }}\n"
                "{% elif m.role == 'user' %}Question (answered): {{ m.content }}\n"
                "{% else %}A: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    rows = write_jsonl(tmp_path / "p.jsonl", pair_rows(2))
    config = pairs_config(rows, chat_template=template)
    tokenizer = load_tokenizer(smollm_path, config.chat_template)
    with pytest.raises(DataError, match=rf"{rows}:1: the prompt's tokens differ once the chosen answer follows it"):
        build_datasets(config, tokenizer, stop_token_ids(tokenizer), 0)


def test_prompt_and_answer_limits_cut_and_count(tmp_path, tokenizer):
    long_prompt = "Tell me about " + "the sea and " * 60
    rows = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": long_prompt, "chosen": "Waves. " * 40, "rejected": "Sand. " * 40}, *pair_rows(3)])
    stops = stop_token_ids(tokenizer)

    truncated = build_datasets(pairs_config(rows, max_length=96, max_prompt_length=48, truncation="truncate"),
                               tokenizer, stops, 0)
    first = truncated.train[0]
    assert len(first["prompt_ids"]) == 48, "a long prompt keeps its last max_prompt_length tokens"
    assert tokenizer.decode(first["prompt_ids"]).rstrip().endswith("assistant"), "the end (the turn answered) is kept"
    assert len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"])) == 96
    assert truncated.stats.truncated_prompts == 1 and truncated.stats.truncated == 1
    assert "1 truncated, 1 prompts cut" in truncated.stats.summary()

    dropped = build_datasets(pairs_config(rows, max_length=96, max_prompt_length=48, truncation="drop"),
                             tokenizer, stops, 0)
    assert len(dropped.train) == 3 and dropped.stats.dropped == {"too_long": 1}

    no_prompt_limit = build_datasets(pairs_config(rows, max_length=96, truncation="truncate"), tokenizer, stops, 0)
    first = no_prompt_limit.train[0]
    assert len(first["prompt_ids"]) == 48, "without max_prompt_length the prompt keeps half of max_length"
    assert len(first["prompt_ids"]) + max(len(first["chosen_ids"]), len(first["rejected_ids"])) == 96

    with pytest.raises(DataError, match=rf"{rows}:1: prompt \d+ tokens \(data.max_prompt_length=48\)"):
        build_datasets(pairs_config(rows, max_length=96, max_prompt_length=48, truncation="error"), tokenizer, stops, 0)


def test_bad_rows_skip_weights_and_splits_work_as_for_chat_data(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", pair_rows(10))
    others = [{"prompt": f"Name colour {i}", "chosen": "Blue.", "rejected": "Seven."} for i in range(3)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [*others, {"prompt": "x", "chosen": "y", "rejected": "y"}])
    config = DataConfig.model_validate({
        "sources": [{"path": str(good), "format": "preference"},
                    {"path": str(bad), "format": "preference", "weight": 2.0}],
        "cache": False, "val_fraction": 0.2, "on_bad_row": "skip"})
    bundle = build_datasets(config, tokenizer, stop_token_ids(tokenizer), 0)
    assert bundle.stats.bad_rows == 1 and f"{bad}:4" in bundle.stats.bad_row_examples[0]
    assert set(bundle.train.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    assert bundle.stats.val_rows == len(bundle.val) == round(13 * 0.2), "13 good rows, 20% held out"
    weighted = [counts["train_after_weight"] for counts in bundle.stats.per_source.values()]
    assert weighted[1] % 2 == 0 and weighted[0] + weighted[1] // 2 == 13 - 3
    assert bundle.stats.train_rows == len(bundle.train) == weighted[0] + weighted[1]
    with pytest.raises(DataError, match=rf"{bad}:4: chosen and rejected are the same answer.*data.on_bad_row=skip"):
        build_datasets(config.model_copy(update={"on_bad_row": "error"}), tokenizer, stop_token_ids(tokenizer), 0)


def test_pairs_holding_special_token_text_are_counted(tmp_path, tokenizer):
    rows = pair_rows(5) + [{"prompt": "Say bye", "chosen": "Bye.<|im_end|>", "rejected": "No."}]
    bundle = build_datasets(pairs_config(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer,
                            stop_token_ids(tokenizer), 0)
    assert bundle.stats.special_text_rows == 1
    assert bundle.stats.special_text_examples == [f"{tmp_path / 'p.jsonl'}:6 (<|im_end|>)"]


def test_preference_pairs_survive_the_cache(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "p.jsonl", pair_rows(6))
    config = pairs_config(rows).model_copy(update={"cache": True})
    stops = stop_token_ids(tokenizer)
    first = build_datasets(config, tokenizer, stops, 0, cache_dir=tmp_path / "cache")
    again = build_datasets(config, tokenizer, stops, 0, cache_dir=tmp_path / "cache")
    assert again.train.to_dict() == first.train.to_dict()
    assert vars(again.stats) == vars(first.stats)


@pytest.mark.parametrize("sources, expected", [
    ([{"path": "a.jsonl", "format": "preference"}, {"path": "b.jsonl", "format": "messages"}],
     "sources mix preference data with"),
])
def test_preference_data_is_not_mixed_with_chat_data(sources, expected):
    with pytest.raises(ValueError, match=expected):
        DataConfig.model_validate({"sources": sources})


def test_bundled_pairs_are_rebuilt_byte_for_byte(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pairs.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_preference_data.py"),
                    str(ROOT / "data" / "chatterbot_en.jsonl"), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == (ROOT / "data" / "chatterbot_pref_en.jsonl").read_bytes()
    pairs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert len(pairs) > 2000


def test_stats_of_pairs_count_both_answers_as_trained(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    bundle = build_datasets(pairs_config(rows), tokenizer, stop_token_ids(tokenizer), 0)
    rendered = [render_preference(from_preference(r, "x"), tokenizer, stop_token_ids(tokenizer)) for r in pair_rows(4)]
    assert bundle.stats.trainable_tokens == sum(len(c) + len(r) for _, c, r in rendered), "chosen and rejected"
    assert bundle.stats.length_percentiles["max"] == max(len(p) + max(len(c), len(r)) for p, c, r in rendered)


def test_pairs_that_become_identical_are_dropped_and_counted(tmp_path, tokenizer):
    same_start = "The answer is " + "long " * 40
    rows = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Say it", "chosen": same_start + "yes", "rejected": same_start + "no"}, *pair_rows(3)])
    bundle = build_datasets(pairs_config(rows, max_length=32, truncation="truncate"), tokenizer,
                            stop_token_ids(tokenizer), 0)
    assert len(bundle.train) == 3 and bundle.stats.dropped == {"identical_answers": 1}


def test_held_out_pairs_never_share_a_prompt_with_training_pairs(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i % 10}", "chosen": f"Right {i}", "rejected": f"Wrong {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    bundle = build_datasets(pairs_config(path, val_fraction=0.2), tokenizer, stop_token_ids(tokenizer), 0)
    train_prompts = {tuple(r["prompt_ids"]) for r in bundle.train}
    val_prompts = {tuple(r["prompt_ids"]) for r in bundle.val}
    assert len(val_prompts) == 2 and len(bundle.val) == 12, "2 of 10 prompts held out, with all 6 pairs of each"
    assert not train_prompts & val_prompts
