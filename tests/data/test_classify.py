"""task: classification on the tiny llama: label maps, class weights, metrics, predict."""

import json
import random
from pathlib import Path

import pytest

from loraforge.data.classify import class_weights, label_set
from loraforge.errors import ConfigError, DataError
from loraforge.eval.metrics import classification_metrics


def reviews(n=48, seed=0):
    rng = random.Random(seed)
    subjects = ["The film", "This book", "The meal", "Our trip", "The show", "That song"]
    rows = []
    for i in range(n):
        positive = i % 3 != 0
        rows.append({"text": f"{rng.choice(subjects)} was {'great' if positive else 'awful'}",
                     "label": "positive" if positive else "negative"})
    return rows


def test_metrics():
    found = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["a", "b"])
    assert found["accuracy"] == 0.75
    assert found["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 1], [0, 1]]
    assert found["f1_per_label"] == {"a": pytest.approx(0.8), "b": pytest.approx(2 / 3)}
    assert found["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_label_set_and_weights():
    labels = label_set(["b", "a", "b", "b"], None)
    assert labels == ["a", "b"]
    assert class_weights(["b", "a", "b", "b"], labels, "auto") == [2.0, pytest.approx(2 / 3)]
    assert class_weights(["b", "a"], labels, {"a": 3}) == [3.0, 1.0]
    assert class_weights(["b", "a"], labels, "none") is None
    with pytest.raises(DataError, match=r"training labels \['c'\] are not in classification.labels"):
        label_set(["a", "c"], ["a", "b"])
    with pytest.raises(ConfigError, match="unknown labels"):
        class_weights(["a"], labels, {"z": 1.0})


def test_source_weights_apply_and_an_emptied_validation_split_is_refused(tmp_path, tokenizer):
    from loraforge.config.data_section import DataConfig
    from loraforge.config.schema import ClassificationConfig
    from loraforge.data.classify import build_classification
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "r.jsonl", reviews(20))
    long = write_jsonl(tmp_path / "long.jsonl", [{"text": "The film was great " * 20, "label": "positive"}] * 3)

    def build(*sources, val_fraction=0.2):
        config = DataConfig.model_validate({"sources": [{"format": "classification", **s} for s in sources],
                                            "val_fraction": val_fraction, "max_length": 32, "cache": False})
        return build_classification(config, ClassificationConfig(), tokenizer, seed=0)

    train, val, *_ = build({"path": str(path)})
    assert (len(train), len(val)) == (16, 4)
    assert len(build({"path": str(path), "weight": 3})[0]) == 48, "data.sources[].weight repeats the rows, as for chat"
    with pytest.raises(DataError, match=r"all 3 validation rows were dropped \(longer than data.max_length=32"):
        build({"path": str(path)}, {"path": str(long), "split": "val"})


def test_classifier_learns_a_separable_task_and_predicts(train_tiny, tmp_path, capsys):
    from loraforge.cli import main

    config, result = train_tiny(
        "task=classification", "classification.class_weights=auto", "train.max_steps=30", "train.eval_every=30",
        "train.learning_rate=0.005", "train.batch_size=8", "lora.target_modules=all-linear",
        rows=reviews(), fmt="classification",
    )
    run = Path(config.output_dir)
    assert json.loads((run / "labels.json").read_text()) == ["negative", "positive"]
    report = json.loads((run / "eval.json").read_text())
    assert report["metrics_after"]["accuracy"] >= 0.9 > report["metrics_before"]["accuracy"], "chance 0.5, majority 0.67"
    assert report["metrics_after"]["macro_f1"] >= 0.85
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert any("score" in name for name in _adapter_names(run)), "the classification head is trained and saved"
    assert result.summary().splitlines()[-1] == f"Label a text with it: loraforge predict {run} --text TEXT"

    assert main(["predict", str(run), "--text", "The show was awful"]) == 0
    label, probability = capsys.readouterr().out.strip().split("\t")
    assert label == "negative" and float(probability) > 0.5

    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in ["The meal was great", "That song was awful"]) + "\n")
    assert main(["predict", str(run), "--file", str(texts)]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in predictions] == ["positive", "negative"]


def test_eval_command_on_a_classification_run(train_tiny, capsys):
    from loraforge.cli import main

    config, _ = train_tiny(
        "task=classification", "train.max_steps=30", "train.eval_every=30", "train.learning_rate=0.005",
        "train.batch_size=8", "lora.target_modules=all-linear", "data.test_fraction=0.2",
        "data.system_prompt=You are a helpful assistant.", rows=reviews(), fmt="classification",
    )
    test = json.loads((Path(config.output_dir) / "eval.json").read_text())["test"]
    assert test["rows"] == 10 and test["accuracy"] >= 0.9 and "confusion_matrix" in test
    assert main(["eval", config.output_dir, "--split", "test"]) == 0
    again = json.loads((Path(config.output_dir) / "eval" / "test.json").read_text())["fine_tuned"]
    assert again["accuracy"] == test["accuracy"] and again["confusion_matrix"] == test["confusion_matrix"]
    capsys.readouterr()
    assert main(["eval", config.output_dir, "--compare-base"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out
    written = json.loads((Path(config.output_dir) / "eval" / "validation.json").read_text())
    assert written["fine_tuned"]["accuracy"] >= 0.9 and "base" not in written
    assert sum(map(sum, written["fine_tuned"]["confusion_matrix"]["rows_true_columns_predicted"])) == written["rows"]


def _adapter_names(run):
    from safetensors.torch import load_file

    return list(load_file(run / "adapter" / "adapter_model.safetensors"))


def test_classification_needs_classification_data(tmp_path):
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("task: classification\ndata:\n  sources: [{path: d.jsonl, format: messages}]\n")
    with pytest.raises(ConfigError, match="every data source in format classification"):
        load_config(path)


def test_chat_refuses_a_classification_run_and_predict_a_chat_run(train_tiny, capsys):
    from loraforge.cli import main

    config, _ = train_tiny("train.max_steps=2")
    assert main(["predict", config.output_dir, "--text", "x"]) == 2
    assert "use `loraforge chat" in capsys.readouterr().err


def test_macro_f1_leaves_out_labels_neither_in_the_data_nor_predicted():
    found = classification_metrics([0, 1], [0, 1], ["pos", "neg", "neutral"])
    assert found["macro_f1"] == 1.0 and found["f1_per_label"] == {"pos": 1.0, "neg": 1.0, "neutral": None}
    predicted_only = classification_metrics([0, 2], [0, 1], ["pos", "neg", "neutral"])
    assert predicted_only["macro_f1"] == pytest.approx(1 / 3), "a label predicted but absent counts, with F1 0"


def test_predict_refuses_an_empty_text_with_where_it_is(train_tiny, tmp_path, capsys):
    from loraforge.cli import main

    config, _ = train_tiny("train.max_steps=1")
    assert main(["predict", config.output_dir, "--text", "  "]) == 2
    assert "--text is empty" in capsys.readouterr().err
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "fine"}\n{"text": ""}\n', encoding="utf-8")
    assert main(["predict", config.output_dir, "--file", str(texts)]) == 2
    assert f"{texts}:2: the text is empty" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    assert main(["predict", config.output_dir, "--file", str(blank)]) == 2
    assert f"{blank}: holds no texts" in capsys.readouterr().err


def test_loading_a_causal_checkpoint_as_a_classifier_says_nothing_of_the_head_loraforge_trains(tiny_model_dir):
    import logging

    from loraforge.model.load import NewHeadReport, load_model

    reporter = logging.getLogger("transformers.modeling_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    reporter.addHandler(handler)
    try:
        load_model(str(tiny_model_dir), task="classification", labels=["neg", "pos"])
    finally:
        reporter.removeHandler(handler)
    assert not [m for m in seen if "LOAD REPORT" in m]

    def shown(text: str) -> bool:
        return NewHeadReport().filter(logging.LogRecord(reporter.name, logging.WARNING, __file__, 0, text, None, None))

    head = "LlamaForSequenceClassification LOAD REPORT from: x\nKey | Status | \n----+----\n"
    assert not shown(head + "score.weight | \x1b[31mMISSING\x1b[0m | \n"), "coloured as in a terminal"
    assert shown(head + "score.weight | MISSING | \nmodel.norm.weight | UNEXPECTED | \n"), "anything else is shown"


def test_predict_says_what_is_wrong_with_a_text_file_or_a_labels_json_in_one_line(train_tiny, tmp_path, capsys):
    """A text file with bytes that are not UTF-8, and a run whose labels.json is gone or damaged, ended predict
    (and eval, merge) in a traceback."""
    import shutil

    from loraforge.cli import main

    config, _ = train_tiny("task=classification", "train.max_steps=1", rows=reviews(), fmt="classification")
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"good\n\xff bad\n")
    assert main(["predict", config.output_dir, "--file", str(texts)]) == 2
    assert f"error: {texts}:2: not UTF-8 text (invalid start byte); save the file as UTF-8" in capsys.readouterr().err
    copy = shutil.copytree(config.output_dir, tmp_path / "copy")
    labels = copy / "labels.json"
    for damage, said in ((None, f"{copy} lacks labels.json (its label names in id order); copy the run again, whole"),
                         ('["negative", "pos', f"{labels} cannot be read (Unterminated string"),
                         ('{"0": "negative"}', f"{labels} is not a list of label names as loraforge wrote it")):
        labels.unlink(missing_ok=True)
        if damage is not None:
            labels.write_text(damage)
        for command in (["predict", str(copy), "--text", "fine"], ["eval", str(copy), "--max-samples", "0"]):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert f"error: {said}" in err and "Traceback" not in err, err[-1000:]
