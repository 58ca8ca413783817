"""`loraforge eval` on a tiny run: token metrics checked against an independent computation, generation metrics."""

import json
import logging
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

    config, result = train_tiny("precision=fp32")  # bf16 agreement: the test split's test below
    assert main(["eval", config.output_dir, "--compare-base", "--max-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "rouge_l" in out and "fine_tuned" in out and "base" in out
    written = json.loads((Path(config.output_dir) / "eval" / "validation.json").read_text())
    tuned, base = written["fine_tuned"], written["base"]
    assert written["rows"] == 6 and tuned["samples"] == 4
    assert tuned["loss"] == pytest.approx(result.eval_after, rel=1e-5), "same validation split, same precision"
    assert base["loss"] == pytest.approx(result.eval_before, rel=1e-5)
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)
    assert 0 <= tuned["token_accuracy"] <= 1 and tuned["token_accuracy"] >= base["token_accuracy"]


def test_eval_of_a_bf16_run_repeats_its_validation_loss(train_tiny):
    """bf16 sums depend on how rows are batched and padded: eval batches the validation rows as the trainer did."""
    config, result = train_tiny("precision=bf16", "train.max_steps=2", "train.eval_every=2",
                                rows=[{"messages": [{"role": "user", "content": "Echo " + "word " * (i % 7)},
                                                    {"role": "assistant", "content": "ok " * (1 + i % 5)}]}
                                      for i in range(40)])
    found = run_eval(config.output_dir, max_samples=0)
    assert found["precision"] == "bf16"
    assert found["fine_tuned"]["loss"] == pytest.approx(result.eval_after, rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_test_split_is_evaluated_once_after_training_and_again_by_eval(train_tiny, capsys, precision):
    from loraforge.cli import main
    from loraforge.errors import DataError

    config, result = train_tiny("train.max_steps=2", "data.test_fraction=0.25", "eval.test_generations=3",
                                f"precision={precision}")
    run = Path(config.output_dir)
    test = json.loads((run / "eval.json").read_text())["test"]
    assert test["rows"] == 6 and test["samples"] == 3, "24 rows: 6 held out for test, then validation from the rest"
    assert {"loss", "perplexity", "token_accuracy", "rouge_l", "exact_match"} <= set(test)
    assert result.test == test and f"Test (6 rows): loss {test['loss']:.4f}" in result.summary()
    assert "## Test split" in (run / "report.md").read_text()
    assert result.metrics is not None and json.loads((run / "eval.json").read_text())["data"]["test_rows"] == 6

    assert main(["eval", str(run), "--split", "test", "--max-samples", "3"]) == 0
    again = json.loads((run / "eval" / "test.json").read_text())["fine_tuned"]
    assert again["loss"] == pytest.approx(test["loss"], rel=1e-5), (
        "the same rows and weights, in the same precision, as at the end of training")
    assert again["examples"] == test["examples"] and again["rouge_l"] == test["rouge_l"], (
        "answers generated as training generated them (its forward's autocast does not reach generate())")
    written = json.loads((run / "eval" / "test.json").read_text())
    assert written["precision"] == written["trained_precision"] == precision
    assert f"6 rows from test split, computed in {precision} as trained" in capsys.readouterr().out

    plain, _ = train_tiny("train.max_steps=1")
    with pytest.raises(DataError, match="the run has no test split: set data.test_fraction"):
        run_eval(plain.output_dir, split="test")


def test_eval_on_another_file(train_tiny, tmp_path):
    from tests.conftest import write_jsonl

    config, _ = train_tiny("train.max_steps=2")
    data = write_jsonl(tmp_path / "held_out.jsonl", [
        {"messages": [{"role": "user", "content": "Echo teal"}, {"role": "assistant", "content": "teal teal"}]}] * 3)
    results = run_eval(config.output_dir, data=str(data), max_samples=2)
    assert results["rows"] == 3 and results["fine_tuned"]["samples"] == 2
    assert results["fine_tuned"]["examples"][0]["reference"] == "teal teal"
    assert Path(results["written_to"]).is_file() and Path(results["written_to"]).name.startswith("data-held_out-")


def test_eval_rewrites_its_own_result_and_never_a_file_it_did_not_write(train_tiny):
    from loraforge.errors import ExportError

    config, _ = train_tiny("train.max_steps=2")
    first = Path(run_eval(config.output_dir, max_samples=0)["written_to"])
    assert first == Path(config.output_dir) / "eval" / "validation.json"
    again = run_eval(config.output_dir, max_samples=1)
    assert Path(again["written_to"]) == first and json.loads(first.read_text())["fine_tuned"]["samples"] == 1
    (first.parent / ".loraforge-files.json").unlink()
    assert Path(run_eval(config.output_dir, max_samples=0)["written_to"]) == first, (
        "a result an eval wrote before eval kept a ledger is its own")
    first.write_text("my notes\n")
    with pytest.raises(ExportError, match=r"eval .*/eval holds files loraforge did not write, or that changed since it "
                                          r"wrote them \(validation.json\); move them away: loraforge never overwrites"):
        run_eval(config.output_dir, max_samples=0)
    assert first.read_text() == "my notes\n"


def test_eval_reads_a_data_file_in_the_format_given(train_tiny, tmp_path, capsys, monkeypatch):
    """A run trained on messages evaluates the same conversations written as alpaca rows with --format alpaca, to
    the same loss; without --format the file is read as messages and refused with its line; --format needs --data."""
    from loraforge.eval import run as eval_run
    from loraforge.cli import main
    from tests.conftest import ECHO_ROWS, write_jsonl

    config, _ = train_tiny("train.max_steps=2")
    rows = ECHO_ROWS[:6]
    as_messages = write_jsonl(tmp_path / "messages.jsonl", rows)
    as_alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]} for r in rows])
    assert main(["eval", config.output_dir, "--data", str(as_messages), "--max-samples", "0"]) == 0
    assert main(["eval", config.output_dir, "--data", str(as_alpaca), "--format", "alpaca", "--max-samples", "0"]) == 0
    written = {name: json.loads(next((Path(config.output_dir) / "eval").glob(f"data-{name}-*.json")).read_text())
               for name in ("messages", "alpaca")}
    assert written["alpaca"]["rows"] == written["messages"]["rows"] == 6
    assert written["alpaca"]["fine_tuned"]["loss"] == pytest.approx(written["messages"]["fine_tuned"]["loss"], rel=1e-6)
    capsys.readouterr()
    loads = []
    monkeypatch.setattr(eval_run, "load_run", lambda *a, **k: loads.append(a) or pytest.fail("loaded the model"))
    assert main(["eval", config.output_dir, "--data", str(as_alpaca), "--max-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{as_alpaca}:1: no 'messages' field" in err
    assert (f"--data {as_alpaca} is read as the run's source of format messages and its data.on_bad_row=error; eval "
            "takes no config changes: fix the rows or name the columns as the run's, or give the file's format with "
            "--format") in err, "the data.* keys the row error names are the run's, which eval cannot change"
    assert main(["eval", config.output_dir, "--data", str(as_messages), "--format", "alpaca", "--max-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{as_messages}:1: no 'instruction' field" in err
    assert (f"--data {as_messages} is read in format alpaca, with its own column names (instruction, input, output; "
            "the run has no source of that format), and the run's data.on_bad_row=error; eval takes no config changes: "
            "fix the rows or name the columns so\n") in err, "not as a source the run has, nor --format to give"
    assert main(["eval", config.output_dir, "--data", str(as_alpaca), "--format", "preference"]) == 2
    assert "--format preference: this run (method sft) evaluates rows of format alpaca or" in capsys.readouterr().err
    assert main(["eval", config.output_dir, "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"error: --data {tmp_path / 'missing.jsonl'}: data file not found (cwd is " in err
    assert "--format" not in err and "data.sources" not in err, "no hint for a config eval does not take"
    assert main(["eval", config.output_dir, "--format", "alpaca"]) == 2
    assert "--format names the format of a --data file; give --data FILE with it" in capsys.readouterr().err
    assert loads == [], "each file was refused before the model was loaded"


def test_the_trained_precision_is_read_from_the_manifest_and_none_without_one(tmp_path):
    from loraforge import rundir

    manifest = tmp_path / rundir.MANIFEST
    assert rundir.trained_precision(tmp_path) is None, "no manifest"
    for written, expected in [({"precision": {"requested": "auto", "chosen": "bf16"}}, "bf16"),
                              ({"precision": {"requested": "auto", "chosen": "fp32"}}, "fp32"),
                              ({"precision": {"requested": "auto", "chosen": "fp16"}}, "fp16"),
                              ({"precision": {"chosen": "int3"}}, None), ({"precision": "bf16"}, None), ([], None)]:
        manifest.write_text(json.dumps(written))
        assert rundir.trained_precision(tmp_path) == expected, written
    manifest.write_text('{"precision": {"chosen": "bf1')
    assert rundir.trained_precision(tmp_path) is None, "a truncated manifest"


def test_eval_of_a_bf16_run_warns_where_bf16_is_slower_and_computes_in_fp32_when_asked(train_tiny, caplog,
                                                                                          monkeypatch, capsys):
    import loraforge.eval.run as eval_run
    from loraforge import rundir
    from loraforge.cli import main
    from loraforge.errors import ConfigError
    from loraforge.model.precision import cpu_speeds
    from transformers import AutoConfig

    config, _ = train_tiny("train.max_steps=1", "precision=bf16")
    run = Path(config.output_dir)
    slow = "this CPU runs bf16 matmuls slower than fp32"
    with caplog.at_level("WARNING", logger="loraforge"):
        found = run_eval(run)
    assert found["precision"] == "bf16"
    speeds = cpu_speeds(AutoConfig.from_pretrained(config.model.name))
    assert (slow in caplog.text) == (speeds["bf16_gflops"] < speeds["fp32_gflops"]), "as this CPU measured"
    for bf16, fp32, warned in [(50.0, 250.0, True), (400.0, 200.0, False)]:
        caplog.clear()
        monkeypatch.setattr(eval_run, "cpu_speeds", lambda _config, b=bf16, f=fp32: {"bf16_gflops": b, "fp32_gflops": f})
        with caplog.at_level("WARNING", logger="loraforge"):
            assert run_eval(run)["precision"] == "bf16"
        assert (slow in caplog.text) == warned and ("--precision fp32 is faster" in caplog.text) == warned

    caplog.clear()
    with caplog.at_level("WARNING", logger="loraforge"):
        assert main(["eval", str(run), "--precision", "fp32"]) == 0
    assert slow not in caplog.text
    assert "computed in fp32 (trained in bf16)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="precision 'fp16': eval computes in fp32 or bf16"):
        run_eval(run, precision="fp16")
    (run / rundir.MANIFEST).unlink()
    assert main(["eval", str(run)]) == 0
    assert "computed in fp32 (no manifest.json says how it trained)" in capsys.readouterr().out


def test_eval_reads_the_run_data_from_where_it_trained_and_refuses_a_changed_file(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    from loraforge.config import load_config
    from loraforge.errors import DataError
    from loraforge.training.run import run_training
    from tests.conftest import ECHO_ROWS, write_jsonl, write_tiny_config

    trained_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    trained_in.mkdir(), elsewhere.mkdir()
    config_path = write_tiny_config(trained_in, tiny_model_dir, "{max_steps: 2, batch_size: 4, save_every: null}")
    config_path.write_text(config_path.read_text().replace(str(trained_in / "echo.jsonl"), "echo.jsonl"))
    monkeypatch.chdir(trained_in)
    config = load_config(config_path, [f"output_dir={trained_in / 'run'}", "precision=fp32"])
    assert config.data.sources[0].path == "echo.jsonl"
    run_training(config)
    after = json.loads((trained_in / "run" / "eval.json").read_text())["eval_loss_after"]

    monkeypatch.chdir(elsewhere)
    write_jsonl(elsewhere / "echo.jsonl", list(reversed(ECHO_ROWS)))  # same name, other rows
    assert run_eval(trained_in / "run", max_samples=0)["fine_tuned"]["loss"] == pytest.approx(after, rel=1e-5)

    write_jsonl(trained_in / "echo.jsonl", ECHO_ROWS[:-1])
    with pytest.raises(DataError, match=r"echo.jsonl \(data.sources path echo.jsonl of .*\) has changed since the "
                                        r"run trained on it.*--data"):
        run_eval(trained_in / "run", max_samples=0)
    (trained_in / "echo.jsonl").unlink()
    with pytest.raises(DataError, match="is not there"):
        run_eval(trained_in / "run", max_samples=0)


def test_eval_reads_the_run_data_from_here_with_a_warning_once_the_folder_it_trained_in_is_gone(
        tmp_path, tiny_model_dir, monkeypatch, caplog):
    """As model.name (given_in): the project moved, a relative data path is the file of that name in the current
    folder, with a warning naming both. It was looked for in the folder that is gone and refused as not there."""
    import logging

    from loraforge.config import load_config
    from loraforge.training.run import run_training
    from tests.conftest import ECHO_ROWS, write_jsonl, write_tiny_config

    trained_in, moved, here = tmp_path / "project", tmp_path / "moved", tmp_path / "here"
    trained_in.mkdir(), here.mkdir()
    config_path = write_tiny_config(trained_in, tiny_model_dir, "{max_steps: 2, batch_size: 4, save_every: null}")
    config_path.write_text(config_path.read_text().replace(str(trained_in / "echo.jsonl"), "echo.jsonl"))
    monkeypatch.chdir(trained_in)
    run_training(load_config(config_path, [f"output_dir={trained_in / 'run'}", "precision=fp32"]))
    after = json.loads((trained_in / "run" / "eval.json").read_text())["eval_loss_after"]

    trained_in.rename(moved)
    write_jsonl(here / "echo.jsonl", ECHO_ROWS)
    monkeypatch.chdir(here)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        assert run_eval(moved / "run", max_samples=0)["fine_tuned"]["loss"] == pytest.approx(after, rel=1e-5)
    assert [r.getMessage() for r in caplog.records if "echo.jsonl" in r.getMessage()] == [
        f"data.sources path echo.jsonl: {trained_in}, the folder it was given in (the run trained there), is gone "
        f"(moved, renamed, or the run copied from another machine); taking it from the current folder, {here}"]


@pytest.mark.parametrize("damage, warned", [
    ("[]\n", "holds a JSON list, not an object: taken as absent"),
    ('{"precision": "bf16",\n', "cannot be read (Expecting property name enclosed in double quotes"),
    ('{"data_files": ["x"], "cwd": 123, "precision": {"chosen": "fp32"}}\n',
     "cwd, data_files are not of the type loraforge wrote, so left out"),
])
def test_a_damaged_manifest_is_read_without_what_is_damaged_and_said_so(train_tiny, caplog, damage, warned):
    """As every reader of manifest.json takes it (rundir.read_manifest): the run's files as its config names them,
    computed in fp32 where the precision is lost, with a warning naming the file; it stopped eval with an
    AttributeError (data_files a list) and chat with a TypeError (cwd a number), or was taken silently as absent."""
    from loraforge.rundir import base_location, read_config

    config, result = train_tiny("train.max_steps=2", "precision=fp32")
    manifest = Path(config.output_dir) / "manifest.json"
    manifest.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        found = run_eval(config.output_dir, max_samples=0)
        assert base_location(config.output_dir, read_config(config.output_dir)) == str(config.model.name)
    assert found["trained_precision"] == ("fp32" if "chosen" in damage else None)
    assert found["fine_tuned"]["loss"] == pytest.approx(result.eval_after, rel=1e-5)
    assert any(str(manifest) in r.getMessage() and warned in r.getMessage() for r in caplog.records), caplog.text


def test_a_run_on_a_relative_model_folder_loads_it_from_where_it_trained(tmp_path, tiny_model_dir, tokenizer, no_hub,
                                                                      monkeypatch):
    """model.name models/tiny, trained in project/: eval and merge from elsewhere load project/models/tiny, not the
    models/tiny there, and the adapter names its base so that plain PEFT loads it from any folder."""
    import shutil

    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from loraforge.config import load_config
    from loraforge.errors import ModelError
    from loraforge.export.merge import run_merge
    from loraforge.training.run import run_training
    from tests.conftest import save_tiny_llama, write_tiny_config

    trained_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    trained_in.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, trained_in / "models" / "tiny")
    save_tiny_llama(elsewhere / "models" / "tiny", tokenizer, seed=1)
    config_path = write_tiny_config(trained_in, Path("models/tiny"), "{max_steps: 2, batch_size: 4, save_every: null}")
    monkeypatch.chdir(trained_in)
    run_training(load_config(config_path, [f"output_dir={trained_in / 'run'}", "precision=fp32"]))
    run = trained_in / "run"
    after = json.loads((run / "eval.json").read_text())["eval_loss_after"]

    monkeypatch.chdir(elsewhere)
    assert run_eval(run, max_samples=0)["fine_tuned"]["loss"] == pytest.approx(after, rel=1e-5)
    assert run_merge(run).max_abs_logit_diff <= 1e-4
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(trained_in / "models" / "tiny")
    plain = AutoPeftModelForCausalLM.from_pretrained(run / "adapter")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(plain.get_base_model().model.embed_tokens.weight, original.model.embed_tokens.weight)

    shutil.rmtree(trained_in / "models" / "tiny"), shutil.rmtree(elsewhere / "models")
    with pytest.raises(ModelError, match=rf"model.name: folder {trained_in / 'models' / 'tiny'} not found"):
        run_eval(run, max_samples=0)


def test_a_run_stopped_once_its_adapter_is_written_loads_its_relative_model_and_data_from_where_it_trained(
        tmp_path, tiny_model_dir, tokenizer, no_hub, monkeypatch):
    """A run records the folder it trains in as it starts (manifest.json's cwd, completed at its end): one that
    stopped in its final evaluation, its adapter written, is evaluated from elsewhere on project/models/tiny and
    project/echo.jsonl, not on the model and file of those names there. Without a manifest it had no such folder,
    so eval took the current one."""
    import shutil

    from loraforge import rundir
    from loraforge.config import load_config
    from loraforge.training import evaluation
    from loraforge.training.run import run_training
    from tests.conftest import ECHO_ROWS, save_tiny_llama, write_jsonl, write_tiny_config

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    trained_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    trained_in.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, trained_in / "models" / "tiny")
    save_tiny_llama(elsewhere / "models" / "tiny", tokenizer, seed=1)
    write_jsonl(elsewhere / "echo.jsonl", list(reversed(ECHO_ROWS)))
    config_path = write_tiny_config(trained_in, Path("models/tiny"), "{max_steps: 2, batch_size: 4, save_every: null}")
    config_path.write_text(config_path.read_text().replace(str(trained_in / "echo.jsonl"), "echo.jsonl"))
    monkeypatch.chdir(trained_in)
    config = load_config(config_path, [f"output_dir={trained_in / 'run'}", "precision=fp32"])
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "evaluate_after", crash)
        with pytest.raises(RuntimeError, match="the machine went away"):
            run_training(config)
    run = trained_in / "run"
    assert (run / rundir.ADAPTER / "adapter_config.json").is_file() and not (run / rundir.EVAL).exists()
    there = run_eval(run, max_samples=0)["fine_tuned"]["loss"]

    monkeypatch.chdir(elsewhere)
    assert rundir.base_location(run, config) == str(trained_in / "models" / "tiny")
    assert run_eval(run, max_samples=0)["fine_tuned"]["loss"] == pytest.approx(there, rel=1e-5)


def test_eval_says_when_compare_base_has_no_base_to_measure_and_refuses_an_unknown_split(train_tiny, caplog):
    import logging

    from loraforge.errors import ConfigError

    config, _ = train_tiny("train.max_steps=1", "adapter=full", "precision=fp32")
    with caplog.at_level(logging.WARNING, logger="loraforge.eval.run"):
        found = run_eval(config.output_dir, compare_base=True, max_samples=0)
    assert set(found) >= {"fine_tuned"} and "base" not in found
    assert "--compare-base: eval measures no base model for a full fine-tune (no adapter to switch off)" in caplog.text
    with pytest.raises(ConfigError, match="split 'train': eval draws the run's held-out split val or test"):
        run_eval(config.output_dir, split="train")


@pytest.mark.parametrize("output, reference, expected", [
    ("привет мир", "привет мир", 1.0), ("你好世界", "你好世界", 1.0), ("你好", "你好世界", 2 / 3),
    ("Ça va très bien", "ça va bien", 2 * 1.0 * 0.75 / 1.75), ("The answer is 42.", "the answer: 42", 6 / 7),
    ("हिन्दी भाषा", "हिन्दी भाषा", 1.0), ("हिन्दी", "हिन्द", 0.0)])
def test_rouge_l_counts_words_of_every_script(output, reference, expected):
    assert generation_metrics([output], [reference])["rouge_l"] == pytest.approx(expected)


def test_generation_metrics_leave_the_callers_logging_alone_and_are_absent_without_answers(monkeypatch):
    import logging

    from loraforge.eval.run import format_results

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a script that has not configured logging yet
    generation_metrics(["a b"], ["a c"])
    assert logging.root.handlers == [], "a later logging.basicConfig of the user's still works"
    assert generation_metrics([], []) == {"samples": 0}
    shown = format_results({"fine_tuned": {"loss": 1.5, "perplexity": 4.48, "token_accuracy": 0.5, "samples": 0},
                            "rows": 3, "data": "d.jsonl", "written_to": "x.json", "precision": "fp32"})
    assert "rouge_l" in shown and "n/a" in shown.split("rouge_l")[1].splitlines()[0]


def test_eval_data_with_an_answer_and_no_prompt_is_measured_and_not_asked(train_tiny, tmp_path, capsys):
    from loraforge.cli import main
    from tests.conftest import write_jsonl

    config, _ = train_tiny("train.max_steps=1")
    rows = write_jsonl(tmp_path / "rows.jsonl", [
        {"messages": [{"role": "assistant", "content": "red red"}]},
        {"messages": [{"role": "user", "content": "Echo blue"}, {"role": "assistant", "content": "blue blue"}]}])
    assert main(["eval", config.output_dir, "--data", str(rows)]) == 0
    written = json.loads(next((Path(config.output_dir) / "eval").glob("data-rows-*.json")).read_text())
    assert written["rows"] == 2 and written["fine_tuned"]["samples"] == 1


def test_results_of_files_named_alike_or_like_a_split_are_kept_apart(train_tiny, tmp_path):
    import loraforge
    from tests.conftest import write_jsonl

    config, _ = train_tiny("train.max_steps=1")
    split = loraforge.evaluate(config.output_dir, max_samples=0)
    rows = [{"messages": [{"role": "user", "content": "Echo teal"}, {"role": "assistant", "content": "teal teal"}]}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = loraforge.evaluate(config.output_dir, data=str(write_jsonl(tmp_path / "a" / "validation.jsonl", rows)),
                               max_samples=0)
    second = loraforge.evaluate(config.output_dir, data=str(write_jsonl(tmp_path / "b" / "validation.jsonl", rows * 2)),
                                max_samples=0)
    assert len({split.written_to, first.written_to, second.written_to}) == 3
    assert json.loads(split.written_to.read_text())["rows"] == split.rows == 6
    assert json.loads(first.written_to.read_text())["rows"] == 1 and json.loads(second.written_to.read_text())["rows"] == 2


def test_the_api_evaluates_a_file_in_the_format_given(train_tiny, tmp_path):
    import loraforge
    from tests.conftest import write_jsonl

    config, _ = train_tiny("train.max_steps=1")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Echo teal", "input": "", "output": "teal teal"}])
    found = loraforge.evaluate(config.output_dir, data=str(alpaca), data_format="alpaca", max_samples=0)
    assert found.rows == 1 and found.metrics["fine_tuned"]["loss"] > 0


def test_a_manifest_without_the_digest_of_a_data_file_is_said_to_leave_it_unchecked(train_tiny, caplog):
    """A hand-edited manifest.json whose data_files holds null for a file: eval draws the held-out rows from the
    file as it is, and says that it could not check them; it went on silently."""
    config, result = train_tiny("train.max_steps=2", "precision=fp32")
    manifest = Path(config.output_dir) / "manifest.json"
    written = json.loads(manifest.read_text())
    (source,) = written["data_files"]
    manifest.write_text(json.dumps({**written, "data_files": {source: None}}))
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        found = run_eval(config.output_dir, max_samples=0)
    assert found["fine_tuned"]["loss"] == pytest.approx(result.eval_after, rel=1e-5)
    assert [r.getMessage() for r in caplog.records if "digest" in r.getMessage()] == [
        f"{manifest} records no digest of {source} (data.sources path {source}), so whether it changed since the run "
        "trained on it is not checked: its held-out rows are drawn from the file as it is now"]


def test_rows_training_would_drop_are_counted_and_a_file_of_only_such_rows_is_refused(train_tiny, tmp_path, capsys):
    """A file whose every row passed data.max_length gave a loss of 0 and a perplexity of 1 over no rows, and
    rows dropped from a file were not said at all."""
    from loraforge.cli import main
    from tests.conftest import ECHO_ROWS, write_jsonl

    config, _ = train_tiny("train.max_steps=1", "data.max_length=64")
    long = {"messages": [{"role": "user", "content": "Echo " + "red " * 200}, {"role": "assistant", "content": "red"}]}
    only_long = write_jsonl(tmp_path / "long.jsonl", [long] * 3)
    assert main(["eval", config.output_dir, "--data", str(only_long), "--max-samples", "0"]) == 2
    assert ("error: all 3 rows were dropped, as training drops them (too long: 3; the run's data.max_length is 64): "
            "nothing is left to measure; give rows that fit") in capsys.readouterr().err
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*ECHO_ROWS[:4], long])
    assert main(["eval", config.output_dir, "--data", str(mixed), "--max-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert f"4 rows from {mixed} (1 more dropped as training drops them: too long: 1)," in out
    written = json.loads(next((Path(config.output_dir) / "eval").glob("data-mixed-*.json")).read_text())
    assert written["rows"] == 4 and written["dropped"] == {"too_long": 1}


def test_eval_says_how_far_its_answers_are(train_tiny, tmp_path, caplog):
    """An eval of a real model answered for minutes with nothing said between the load bar and the table."""
    from tests.conftest import ECHO_ROWS, write_jsonl

    config, _ = train_tiny("train.max_steps=1")
    rows = write_jsonl(tmp_path / "rows.jsonl", ECHO_ROWS[:12])
    with caplog.at_level(logging.INFO, logger="loraforge"):
        run_eval(config.output_dir, data=str(rows), max_samples=9)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("answers", "scoring"))]
    assert said[0] == "scoring 12 rows (loss, perplexity, token accuracy)"
    assert [line.split(": ")[0] for line in said[1:]] == ["answers 8/9 (greedy, up to 4 new tokens each)",
                                                          "answers 9/9 (greedy, up to 4 new tokens each)"]
    assert said[1].endswith(" s left") and not said[2].endswith(" s left")
