"""`loraforge eval` on a tiny run: token metrics checked against an independent computation, generation metrics."""

import json
from pathlib import Path

import pytest

from loraforge.eval.run import generation_metrics, run_eval


def test_generation_metrics():
    found = generation_metrics(['{"a": 1}', "Paris is the capital", "no"], ['{"a": 1}', "Paris", "yes"])
    assert found["exact_match"] == pytest.approx(1 / 3)
    assert found["contains"] == pytest.approx(2 / 3)
    assert found["valid_json"] == pytest.approx(1 / 3)
    assert 0 < found["rouge_l"] < 1


def test_eval_command_compares_base_and_fine_tuned(train_tiny, capsys):
    from loraforge.cli import main

    config, result = train_tiny()
    assert main(["eval", config.output_dir, "--compare-base", "--max-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "rouge_l" in out and "fine_tuned" in out and "base" in out
    written = json.loads((Path(config.output_dir) / "eval" / "validation.json").read_text())
    tuned, base = written["fine_tuned"], written["base"]
    assert written["rows"] == 6 and tuned["samples"] == 4
    assert tuned["loss"] == pytest.approx(result.eval_after, rel=0.05), "same validation split as training"
    assert base["loss"] == pytest.approx(result.eval_before, rel=0.05)
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)
    assert 0 <= tuned["token_accuracy"] <= 1 and tuned["token_accuracy"] >= base["token_accuracy"]


def test_eval_on_another_file(train_tiny, tmp_path):
    from tests.conftest import write_jsonl

    config, _ = train_tiny("train.max_steps=2")
    data = write_jsonl(tmp_path / "held_out.jsonl", [
        {"messages": [{"role": "user", "content": "Echo teal"}, {"role": "assistant", "content": "teal teal"}]}] * 3)
    results = run_eval(config.output_dir, data=str(data), max_samples=2)
    assert results["rows"] == 3 and results["fine_tuned"]["samples"] == 2
    assert results["fine_tuned"]["examples"][0]["reference"] == "teal teal"
    assert (Path(config.output_dir) / "eval" / "held_out.json").is_file()
