import copy
import io

import pytest

from loraforge.config import load_config
from loraforge.config.data_section import DataConfig
from loraforge.data.build import build_datasets
from loraforge.preview import format_sample
from loraforge.data.render import stop_token_ids
from loraforge.errors import DataError
from tests.conftest import ROOT, write_jsonl


def test_format_sample_marks_trained_tokens(tokenizer):
    ids = tokenizer("Hello there friend", add_special_tokens=False)["input_ids"]
    labels = [-100, ids[1], ids[2]]
    assert format_sample(ids, labels, tokenizer, color=False) == "Hello[[ there friend]]"
    colored = format_sample(ids, labels, tokenizer, color=True)
    assert "\033[1;32m there friend\033[0m" in colored and "\033[2mHello\033[0m" in colored


def preview_shipped(config_name: str, n: int, smollm_path, monkeypatch, tmp_path) -> str:
    """`data preview` of a shipped config, run from the project root, the built-in model found offline."""
    from loraforge.preview import run_preview

    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path))
    monkeypatch.chdir(ROOT)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "smollm2-135m-instruct").symlink_to(smollm_path)
    out = io.StringIO()
    run_preview(load_config(ROOT / "configs" / f"{config_name}.yaml", ["data.cache=false"]), n=n, stream=out)
    return out.getvalue()


def test_preview_on_the_bundled_data(smollm_path, monkeypatch, tmp_path):
    text = preview_shipped("default", 2, smollm_path, monkeypatch, tmp_path)
    assert text.count("--- data/chatterbot_en.jsonl:") == 2
    assert "[[Artificial Intelligence is the branch of engineering" in text
    assert "<|im_end|>]]" in text and "[[<|im_start|>" not in text
    assert "rows read           2025" in text and "trained tokens" in text and "p90" in text


def test_preview_cli_on_a_fixture(tiny_model_dir, tmp_path, capsys, chat_rows):
    from loraforge.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata:\n  sources: [{{path: {data}}}]\n  cache: false\n")
    assert main(["data", "preview", str(config), "-n", "1", "data.packing=true"]) == 0
    out = capsys.readouterr().out
    assert "[[0.<|im_end|>]]" in out and "What is 0 plus 0?" in out
    assert "packing" in out and "rows," in out


def test_preview_counts_two_sources_of_one_file_apart(tiny_model_dir, tmp_path, capsys, chat_rows):
    from loraforge.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata:\n  sources: [{{path: {data}}}, {{path: {data}, "
                      "split: val}]\n  cache: false\n")
    assert main(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert f"source {data} (data.sources[0]): read 24, bad 0, train_after_weight 24" in out
    assert f"source {data} (data.sources[1]): read 24, bad 0, train_after_weight 0" in out


FIXTURES = ROOT / "tests" / "fixtures" / "formats"
EXPECTED_SPANS = {
    "messages": ["[[Blue.<|im_end|>]]", "[[Rome.<|im_end|>]]"],
    "sharegpt": ["[[Blue.<|im_end|>]]", "[[Rome.<|im_end|>]]"],
    "alpaca": ["[[Blue.<|im_end|>]]", "[[Rome.<|im_end|>]]"],
    "prompt_completion": ["[[Blue.<|im_end|>]]", "[[Rome.<|im_end|>]]"],
    "classification": ["[[positive<|im_end|>]]", "[[negative<|im_end|>]]"],
    "text": ["[[The sky is blue.<|im_end|>]]", "[[Rome is the capital of Italy.<|im_end|>]]"],
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED_SPANS))
def test_preview_shows_correct_masks_for_each_format(fmt, tokenizer, smollm_path, capsys):
    import re

    from loraforge.cli import main

    config = ROOT / "configs" / "default.yaml"
    assert main(["data", "preview", str(config), "-n", "2", f"data.sources=[{{path: {FIXTURES / (fmt + '.jsonl')}, format: {fmt}}}]",
                 "data.val_fraction=0", "data.cache=false"]) == 0
    out = capsys.readouterr().out
    spans = re.findall(r"\[\[.*?\]\]", out, flags=re.S)
    assert spans[1:] == EXPECTED_SPANS[fmt], out
    if fmt == "messages":
        assert "Hello." in out and "[[Hello." not in out, "a turn marked train: false stays masked"


def build(tokenizer, rows, tmp_path, **data):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = DataConfig.model_validate({"sources": [{"path": str(path), "format": data.pop("format", "messages")}],
                                        "val_fraction": 0, "cache": False, **data})
    return build_datasets(config, tokenizer, stop_token_ids(tokenizer), 0)


def test_template_that_never_ends_turns_with_eos_is_refused(tokenizer, tmp_path, chat_rows):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(DataError, match="never learn to stop.*data.chat_template"):
        build(no_eos, chat_rows, tmp_path)


def test_doubled_bos_is_refused(tokenizer, tmp_path):
    rows = [{"text": "<|im_start|><|im_start|>hello"}]
    with_bos = copy.deepcopy(tokenizer)
    with pytest.raises(DataError, match=r"d.jsonl:1: the sample starts with BOS twice"):
        build(with_bos, rows, tmp_path, format="text")


def test_pad_equal_to_eos_does_not_mask_eos(tokenizer, tmp_path, chat_rows):
    bundle = build(tokenizer, chat_rows, tmp_path)
    assert tokenizer.pad_token_id in stop_token_ids(tokenizer)
    assert all(tokenizer.eos_token_id in labels for labels in bundle.train["labels"])


def test_collator_that_masks_by_pad_id_is_caught(tokenizer, tmp_path, chat_rows, monkeypatch):
    """The classic bug: labels masked wherever input == pad id. With pad == EOS that erases every EOS label."""
    import loraforge.data.checks as checks
    import loraforge.data.packing as packing

    class MaskByPadId:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] = -100
            return batch

    real = packing.collator
    monkeypatch.setattr(checks, "collator", lambda tok, packed: MaskByPadId(real(tok, packed)))
    with pytest.raises(DataError, match="batching masked .* trained tokens.*equals EOS"):
        build(tokenizer, chat_rows, tmp_path)


def test_preview_of_the_bundled_pairs_shows_both_answers_trained(smollm_path, monkeypatch, tmp_path):
    text = preview_shipped("dpo", 1, smollm_path, monkeypatch, tmp_path)
    assert text.startswith("1 training pairs, as training draws them ([[trained]] masked):")
    assert "--- data/chatterbot_pref_en.jsonl:1 chosen" in text and "--- data/chatterbot_pref_en.jsonl:1 rejected" in text
    assert "What is AI?<|im_end|>\n<|im_start|>assistant\n[[Artificial Intelligence is the branch" in text
    assert "[[Squirrels<|im_end|>]]" in text, "the rejected answer is trained (pushed down) through its end of turn"
    assert "rows read           2025" in text and "trained tokens" in text


def test_preview_of_unpaired_rows_shows_each_answer_with_its_label(smollm_path, monkeypatch, tmp_path):
    from loraforge.preview import run_preview

    rows = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "What is AI?", "completion": "A branch of computer science.", "label": True},
        {"prompt": "What is AI?", "completion": "Squirrels", "label": False}])
    config = load_config(ROOT / "configs" / "kto.yaml", [
        f"model.name={smollm_path}", f"data.sources=[{{path: {rows}, format: unpaired_preference}}]",
        "data.val_fraction=0", "data.cache=false"])
    out = io.StringIO()
    run_preview(config, n=2, stream=out)
    text = out.getvalue()
    assert text.startswith("2 training unpaired rows, as training draws them ([[trained]] masked):")
    assert f"--- {rows}:1 desirable (" in text and f"--- {rows}:2 undesirable (" in text
    assert "What is AI?<|im_end|>\n<|im_start|>assistant\n[[A branch of computer science.<|im_end|>]]" in text
    assert "[[Squirrels<|im_end|>]]" in text and "rows read           2" in text


def test_preview_of_a_classification_run_shows_the_text_the_classifier_reads_and_its_labels(tiny_model_dir, tmp_path,
                                                                                            capsys, caplog):
    import re

    from loraforge.cli import main

    rows = [{"text": f"The film was {'great' if i % 3 else 'awful'}", "label": "pos" if i % 3 else "neg"}
            for i in range(12)]
    data = write_jsonl(tmp_path / "c.jsonl", rows + ["not json"])
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ntask: classification\ndata:\n  sources: [{{path: {data}, "
                      "format: classification}]\n  cache: false\n  val_fraction: 0.25\n  on_bad_row: skip\n")
    assert main(["data", "preview", str(config), "-n", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("2 samples (text as the classifier reads it, then its label):")
    assert "<|im_start|>" not in captured.out, "no chat template: the classifier reads the text alone"
    assert "), label pos\nThe film was great" in captured.out or "), label neg\nThe film was awful" in captured.out
    counts = re.search(r"training labels     neg (\d+), pos (\d+)\n", captured.out)
    assert counts and int(counts[1]) + int(counts[2]) == 9, "the 9 training rows of 12, by label"
    assert "trained tokens" not in captured.out and "p50 4" in captured.out
    assert sum("bad rows skipped" in r.getMessage() for r in caplog.records) == 1, "said once, not again by preview"


def test_preview_shows_the_training_rows_training_keeps(tiny_model_dir, tmp_path, capsys, chat_rows):
    """Rows dropped as too long are passed over and validation rows are not shown as training samples."""
    import re

    from loraforge.cli import main
    from loraforge.config import load_config
    from loraforge.data.build import DataStats, split_rows

    long = [{"messages": [{"role": "user", "content": "Tell me everything " + "word " * 80},
                          {"role": "assistant", "content": "No."}]} for _ in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", long + chat_rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata:\n  sources: [{{path: {data}}}]\n  cache: false\n"
                      "  max_length: 64\n  val_fraction: 0.25\n")
    assert main(["data", "preview", str(config), "-n", "3"]) == 0
    out = capsys.readouterr().out
    shown = re.findall(r"^--- (\S+) ", out, flags=re.M)
    assert out.startswith("3 training samples") and len(shown) == 3
    loaded = load_config(config)
    train, val, _ = split_rows(loaded.data, loaded.seed, DataStats())
    assert not {f"{data}:{n}" for n in (1, 2, 3)} & set(shown), "the rows training drops are not shown"
    assert not {r.where for r in val} & set(shown), "validation rows are not shown as training samples"
    assert set(shown) <= {r.where for r in train}
