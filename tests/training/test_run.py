"""The whole training recipe and CLI, end to end, on a tiny random llama with the real tokenizer."""

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge import rundir
from loraforge.cli import main
from loraforge.config import load_config
from loraforge.errors import ConfigError, RunDirError
from loraforge.training.run import run_training
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("tiny-run")
    rows = [
        {"messages": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in ["red", "green", "blue", "black", "white", "pink", "gray", "gold"] * 3
    ]
    data = write_jsonl(work / "echo.jsonl", rows)
    config_path = work / "tiny.yaml"
    config_path.write_text(
        f"""
extends: {Path(__file__).resolve().parents[2] / 'configs' / 'default.yaml'}
output_dir: {work / 'run'}
model: {{name: {tiny_model_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data:
  sources: [{{path: {data}, format: messages}}]
  val_fraction: 0.25
train: {{max_steps: 6, batch_size: 4, learning_rate: 0.01, eval_every: 3, logging_steps: 2, warmup_ratio: 0.0}}
eval: {{sample_prompts: [Echo red], max_new_tokens: 4}}
""",
        encoding="utf-8",
    )
    config = load_config(config_path)
    result = run_training(config)
    return config, result, config_path


def test_run_directory_holds_every_output(tiny_run):
    config, result, _ = tiny_run
    run = Path(config.output_dir)
    assert result.run_dir == run
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json",
                 "tokenizer/chat_template.jinja", rundir.RESOLVED, rundir.METRICS, rundir.LOG, rundir.EVAL):
        assert (run / name).is_file(), name
    assert load_config(run / rundir.RESOLVED) == config
    log = (run / rundir.LOG).read_text()
    assert "trainable parameters" in log
    for before_the_directory in ("data: ", "global batch: ", "precision "):
        assert before_the_directory in log.split("trainable parameters")[0], before_the_directory


def test_loss_curve_png_is_drawn_from_the_metrics(tiny_run):
    from loraforge.eval.plots import read_loss_series

    config, _, _ = tiny_run
    run = Path(config.output_dir)
    assert (run / rundir.LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / rundir.LOSS_PLOT).stat().st_size > 10_000
    train, evaluation = read_loss_series(run / rundir.METRICS)
    assert [s for s, _ in train] == [2, 4, 6] and [s for s, _ in evaluation] == [0, 3, 6]
    assert [p.name for p in (run / rundir.CHECKPOINTS).iterdir()] == ["checkpoint-6"], "the final step is checkpointed"


def test_samples_are_logged_at_each_evaluation(tiny_run):
    config, _, _ = tiny_run
    records = [json.loads(l) for l in (Path(config.output_dir) / rundir.METRICS).read_text().splitlines()]
    sampled = [r for r in records if "samples" in r]
    assert [r["step"] for r in sampled] == [3, 6], "the base model answers in report.md, not at a step-0 evaluation"
    assert [s["prompt"] for s in sampled[-1]["samples"]] == ["Echo red"]


def test_report_md_compares_base_and_fine_tuned(tiny_run):
    config, result, _ = tiny_run
    report = (Path(config.output_dir) / rundir.REPORT).read_text()
    assert f"| eval loss | {result.eval_before:.4f} | {result.eval_after:.4f} |" in report
    assert "| perplexity |" in report and "![train and eval loss](loss.png)" in report
    sample = result.samples[0]
    assert f"| Echo red | {sample['base'] or '*(empty)*'} | {sample['finetuned'] or '*(empty)*'} |" in report


def test_metrics_jsonl_has_one_record_per_logged_step(tiny_run):
    config, result, _ = tiny_run
    records = [json.loads(line) for line in (Path(config.output_dir) / rundir.METRICS).read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for record in train:
        assert record["tokens_per_s"] > 0 and record["lr"] > 0 and record["loss"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 0], "the base model's step-0 evaluation runs after training"
    assert evals[-1]["eval_loss"] == pytest.approx(result.eval_before, rel=1e-6)


def test_eval_json_records_before_and_after(tiny_run):
    config, result, _ = tiny_run
    report = json.loads((Path(config.output_dir) / rundir.EVAL).read_text())
    assert report["eval_loss_before"] == pytest.approx(result.eval_before)
    assert report["eval_loss_after"] == pytest.approx(result.eval_after)
    assert report["eval_loss_after"] < report["eval_loss_before"]
    assert report["data"]["train_rows"] == 18 and report["data"]["val_rows"] == 6
    assert report["samples"][0]["prompt"] == "Echo red"
    assert "Eval loss:" in result.summary() and str(result.run_dir) in result.summary()
    assert result.summary().splitlines()[-1] == f"Chat with it: loraforge chat {result.run_dir}"
    spaced = replace(result, run_dir=Path("runs/my run"))
    assert spaced.summary().splitlines()[-1] == "Chat with it: loraforge chat 'runs/my run'", "pastes into a shell"


def test_adapter_moved_and_base_stayed(tiny_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, _, _ = tiny_run
    adapter_dir = Path(config.output_dir) / rundir.ADAPTER
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [w for n, w in weights.items() if "lora_B" in n]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b), "lora_B starts at zero; training must move it"
    assert not any("lora" not in n for n in weights), "only adapter weights are saved"

    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    for name, tensor in base.state_dict().items():
        if name in original:
            assert torch.equal(tensor, original[name]), f"base weight {name} changed on disk"
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with tuned.disable_adapter():
            plain = tuned(input_ids=ids).logits
        adapted = tuned(input_ids=ids).logits
    assert not torch.allclose(plain, adapted), "the saved adapter changes the model's output"


def test_same_seed_same_losses(tiny_run, tmp_path):
    config, _, config_path = tiny_run
    again = load_config(config_path, [f"output_dir={tmp_path / 'again'}"])
    run_training(again)
    read = lambda d: [json.loads(x).get("loss") for x in (Path(d) / rundir.METRICS).read_text().splitlines()]
    assert read(again.output_dir) == read(config.output_dir)


def test_existing_run_directory_is_not_overwritten(tiny_run):
    config, _, _ = tiny_run
    before = (Path(config.output_dir) / rundir.METRICS).read_bytes()
    assert any((Path(config.output_dir) / rundir.CHECKPOINTS).iterdir())
    with pytest.raises(RunDirError, match="already holds a run") as info:
        run_training(config)
    assert "To carry it on from its newest checkpoint, add --resume auto." in str(info.value)
    assert (Path(config.output_dir) / rundir.METRICS).read_bytes() == before


def test_a_disk_too_small_for_the_run_is_refused_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from loraforge.training.checkpoints import bytes_to_write

    config, result, config_path = tiny_run
    trainable = json.loads((Path(config.output_dir) / "eval.json").read_text())["trainable_parameters"]
    needed = bytes_to_write(config.train, trainable)
    written = sum(p.stat().st_size for p in Path(config.output_dir).rglob("*") if p.is_file())
    assert written < needed, "the estimate covers what the finished run holds"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * needed, 9 * needed, needed - 1))
    out = tmp_path / "small-disk"
    with pytest.raises(RunDirError, match=rf"output_dir {out}: \d+ MB free on its disk, and this run writes up to"):
        run_training(load_config(config_path, [f"output_dir={out}"]))
    assert not out.exists()


def test_output_dir_fills_in_model_data_and_time_and_resuming_needs_the_real_name(tiny_run, tmp_path, tiny_model_dir):
    import re
    from datetime import datetime

    from loraforge.config.output_dir import expand_output_dir

    config, _, config_path = tiny_run
    templated = load_config(config_path, [f"output_dir={tmp_path}/{{model}}-{{data}}-{{time}}", "train.max_steps=1"])
    assert expand_output_dir(templated, datetime(2026, 1, 2, 3, 4, 5)).output_dir == \
        f"{tmp_path}/{tiny_model_dir.name}-echo-20260102-030405"
    (tmp_path / f"{tiny_model_dir.name}-echo-20260102-030405").mkdir()
    (tmp_path / f"{tiny_model_dir.name}-echo-20260102-030405-2").mkdir()
    assert expand_output_dir(templated, datetime(2026, 1, 2, 3, 4, 5)).output_dir == \
        f"{tmp_path}/{tiny_model_dir.name}-echo-20260102-030405-3", "a run started in the same second gets its own"
    reserved = [expand_output_dir(templated, datetime(2026, 1, 2, 3, 4, 5), reserve=True).output_dir for _ in range(2)]
    assert reserved == [f"{tmp_path}/{tiny_model_dir.name}-echo-20260102-030405-{n}" for n in (3, 4)], \
        "runs started together: each has made its directory before the next looks"
    assert all(Path(name).is_dir() and not any(Path(name).iterdir()) for name in reserved)
    result = run_training(templated)
    assert re.fullmatch(rf"{re.escape(tiny_model_dir.name)}-echo-\d{{8}}-\d{{6}}", result.run_dir.name), result.run_dir
    assert load_config(result.run_dir / rundir.RESOLVED).output_dir == str(result.run_dir), "resolved.yaml names it"
    with pytest.raises(RunDirError, match="names a new directory at every start; to resume, name the run's directory"):
        run_training(templated, resume="auto")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="not modules of this model"):
        run_training(templated.model_copy(update={"lora": templated.lora.model_copy(update={"target_modules": ["x"]})}))
    assert sorted(tmp_path.iterdir()) == before, "the directory a refused run reserved is removed"


def chat_asked(monkeypatch, stop_at: str | None = None, answer_tokens: int | None = None) -> list:
    """What `loraforge chat` asks the model, call by call (a copy of the chat, or the text); a prompt whose last
    words are stop_at is interrupted as Ctrl-C would; answer_tokens caps the answers (the limit is still checked)."""
    import copy

    import loraforge.chat as chat

    asked = []
    real = chat.generate

    def spy(model, tokenizer, prompt, limit, *args, **kwargs):
        asked.append(copy.deepcopy(prompt))
        said = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        if stop_at is not None and said == stop_at:
            raise KeyboardInterrupt
        return real(model, tokenizer, prompt, answer_tokens or limit, *args, **kwargs)

    monkeypatch.setattr(chat, "generate", spy)
    return asked


def test_cli_chat_prompt_answers_once(tiny_run, capsys):
    config, _, _ = tiny_run
    assert main(["chat", config.output_dir, "--prompt", "Echo red", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_chat_repl_keeps_history_and_resets(tiny_run, capsys, monkeypatch):
    config, _, _ = tiny_run
    asked = chat_asked(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo red\nEcho blue\n/reset\nEcho gold\n/exit\n"))
    assert main(["chat", config.output_dir, "--max-new-tokens", "2"]) == 0
    assert [[m["role"] for m in chat] for chat in asked] == [["user"], ["user", "assistant", "user"], ["user"]]
    assert capsys.readouterr().out.count("assistant> ") == 3


def test_cli_train_reports_bad_config_without_training(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [{path: x.jsonl}]\ntrain:\n  max_stpes: 3\n", encoding="utf-8")
    assert main(["train", str(bad), f"output_dir={tmp_path / 'run'}"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_chat_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["chat", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_training_with_packing_runs_and_learns(tiny_run, tmp_path):
    config, _, config_path = tiny_run
    packed = load_config(config_path, [f"output_dir={tmp_path / 'packed'}", "data.packing=true", "data.max_length=128"])
    result = run_training(packed)
    report = json.loads((Path(packed.output_dir) / rundir.EVAL).read_text())
    assert report["data"]["packed_rows"] < report["data"]["train_rows"]
    assert result.eval_after < result.eval_before


def test_plain_text_run_on_a_model_without_chat_template_samples_as_text(tmp_path, tokenizer, capsys, monkeypatch):
    """Continued pretraining on format text needs no chat template: the samples during and after training, chat and
    the API continue the prompt's text, tokenized as training tokenized its rows."""
    import loraforge
    from tests.conftest import save_tiny_llama

    bare = save_tiny_llama(tmp_path / "bare", tokenizer)
    saved = json.loads((bare / "tokenizer_config.json").read_text())
    saved.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(saved))
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": f"The colour of the {w} sky is {w}."}
                                                 for w in ["red", "green", "blue", "gold"] * 6])
    config_path = tmp_path / "text.yaml"
    config_path.write_text(
        f"model: {{name: {bare}}}\nlora: {{r: 4, alpha: 8}}\n"
        f"data: {{sources: [{{path: {data}, format: text}}], val_fraction: 0.25, cache: false}}\n"
        "train: {max_steps: 2, batch_size: 4, eval_every: 1, save_every: null}\n"
        "eval: {sample_prompts: [The colour of the], max_new_tokens: 2, samples_during_training: 1}\nreport_to: []\n",
        encoding="utf-8")
    config = load_config(config_path, [f"output_dir={tmp_path / 'run'}"])
    result = run_training(config)

    run_dir = Path(config.output_dir)
    assert (run_dir / rundir.ADAPTER / "adapter_config.json").is_file()
    assert [s["prompt"] for s in result.samples] == ["The colour of the"]
    during = [r for r in rundir.read_metrics(run_dir / rundir.METRICS) if "samples" in r]
    assert during and during[-1]["samples"][0]["prompt"] == "The colour of the"

    asked = chat_asked(monkeypatch, stop_at="Stop me")
    assert main(["chat", str(run_dir), "--prompt", "The colour of the", "--max-new-tokens", "2"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Stop me\nThe red\n/exit\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "2"]) == 0
    assert asked == ["The colour of the", "Stop me", "The red"], "Ctrl-C stops one continuation, not the session"
    assert "continued> " in capsys.readouterr().out
    assert len(loraforge.generate(run_dir, ["The colour of the", "The"], max_new_tokens=2)) == 2


def test_a_sample_prompt_the_template_cannot_render_fails_before_training(train_tiny, tmp_path, monkeypatch):
    from loraforge.internals import HookedTrainer
    from loraforge.model.template import TemplateError

    trained = []
    monkeypatch.setattr(HookedTrainer, "train", lambda self, *a, **k: trained.append(1))
    refusing = ("{% for m in messages %}{% if 'Forbidden' in m.content %}{{ raise_exception('no Forbidden') }}"
                "{% endif %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    for asked in ("eval.sample_prompts=[Forbidden]", "eval.samples_during_training=0"), \
                 ("eval.sample_prompts=[Forbidden]", "eval.samples_during_training=1", "eval.num_samples=0"):
        with pytest.raises(TemplateError, match="no Forbidden"):
            train_tiny(f"data.chat_template={json.dumps(refusing)}", *asked)
    assert trained == []


def test_chat_keeps_prompt_and_answer_within_the_models_context(tiny_run, capsys, monkeypatch):
    """The tiny llama takes 1024 positions: a one-shot answer that would pass them is refused before generating; a
    conversation that grows past them leaves its oldest turns out."""
    config, _, _ = tiny_run
    assert main(["chat", config.output_dir, "--prompt", "Echo red", "--max-new-tokens", "3000"]) == 2
    assert "--prompt: it and an answer of up to 3000 tokens" in capsys.readouterr().err

    asked = chat_asked(monkeypatch, answer_tokens=2)
    long_line = "Echo " + "red " * 300
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_line}\n{long_line}\n{long_line}\n{'red ' * 1100}\n/exit\n"))
    assert main(["chat", config.output_dir, "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert "its oldest turns are left out" in err
    assert "(that message: it fills the model's context of 1024 tokens by itself (1130 tokens); shorten it)" in err, \
        "not 'ask for at most 0 tokens'"
    sizes = [len(chat) for chat in asked]
    assert sizes[0] == 1 and max(sizes) < 5 and len(sizes) == 3


def test_ctrl_c_during_an_answer_stops_it_and_the_chat_goes_on(tiny_run, capsys, monkeypatch):
    config, _, _ = tiny_run
    asked = chat_asked(monkeypatch, stop_at="Echo red")
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo red\nEcho blue\n/exit\n"))
    assert main(["chat", config.output_dir, "--max-new-tokens", "2"]) == 0
    assert [[m["content"] for m in chat] for chat in asked] == [["Echo red"], ["Echo blue"]], \
        "the stopped message is not part of the next turn"
    assert "answer stopped" in capsys.readouterr().err


def test_a_warmup_as_long_as_the_run_is_warned_of_before_it_trains(tiny_run, tmp_path, caplog):
    """A script's warmup_steps: 100 over a small dataset: the learning rate rose for the whole run, ending far below
    the one set, without a word."""
    import logging

    _, _, config_path = tiny_run
    config = load_config(config_path, [f"output_dir={tmp_path / 'warm'}", "train.max_steps=2", "train.warmup_steps=8",
                                       "train.logging_steps=1", "train.learning_rate=0.01"])
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        run_training(config)
    assert [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()] == [
        "train.warmup_steps 8 is not shorter than the run's 2 optimizer steps: the learning rate rises for the whole "
        "run, to 1.25e-03 at its last step, 12% of train.learning_rate 0.01; lower train.warmup_steps, or use "
        "train.warmup_ratio"]
    records = [json.loads(line) for line in (tmp_path / "warm" / rundir.METRICS).read_text().splitlines()]
    assert [r["lr"] for r in records if "lr" in r] == [0.0, pytest.approx(1.25e-3)], "as the warning says"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        run_training(config.model_copy(update={"output_dir": str(tmp_path / "short"),
                                               "train": config.train.model_copy(update={"warmup_steps": 1})}))
    assert not [r for r in caplog.records if "warmup" in r.getMessage()]


def test_the_summary_shows_each_sample_on_one_short_line(tmp_path):
    """Answers of 300 new tokens, or with line breaks, ran over screens of the summary; report.md keeps them whole."""
    from loraforge.training.finish import TrainResult

    long = "less" * 300
    result = TrainResult(tmp_path, 3.0, 2.0, 10.0, 100.0, samples=[
        {"prompt": "Say\nhi", "base": long, "finetuned": "hi\n\nthere"}])
    lines = result.summary().splitlines()
    assert lines[lines.index("Prompt:     Say ⏎ hi") + 1:][:2] == [
        f"Base:       {long[:100]} ... (report.md has it whole)", "Fine-tuned: hi ⏎ there"]


def test_a_prompt_that_is_empty_not_utf8_or_too_long_is_refused_in_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """chat and the Python API: an empty prompt on a plain-text run, text with bytes that are not UTF-8 (lone
    surrogates, as a terminal passes them) and, from Python, a prompt that with its answer passes the model's
    context each ended in a traceback, or generated past the context (max_new_tokens=10**9 never ended)."""
    import loraforge
    from loraforge.errors import DataError, ModelError

    config, _, config_path = tiny_run
    run = config.output_dir
    assert main(["chat", run, "--prompt", "Echo \udcff"]) == 2
    assert "error: --prompt: the prompt is not UTF-8 text (character 6 is a byte that is not UTF-8)" in \
        capsys.readouterr().err
    asked = chat_asked(monkeypatch, answer_tokens=2)
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo \udcff\nEcho red\n/exit\n"))
    assert main(["chat", run, "--max-new-tokens", "2"]) == 0
    assert "(that line is not UTF-8 text; type it again)" in capsys.readouterr().err
    assert [chat[-1]["content"] for chat in asked] == ["Echo red"]
    monkeypatch.undo()
    with pytest.raises(ModelError, match=r"prompt 0: it and an answer of up to 1000000000 tokens \(max_new_tokens"):
        loraforge.generate(run, ["Echo red", "Echo blue"], max_new_tokens=10**9)
    with pytest.raises(DataError, match="prompt 0: the prompt is not UTF-8 text"):
        loraforge.generate(run, "Echo \udcff")
    with pytest.raises(TypeError, match="prompts: give a str or a list of str"):
        loraforge.generate(run, [1, 2])

    text_rows = write_jsonl(tmp_path / "text.jsonl", [{"text": f"The colour is {c} and {c}."} for c in ("red", "blue")] * 6)
    plain = load_config(config_path, [f"output_dir={tmp_path / 'plain'}", f"data.sources=[{{path: {text_rows}, "
                                      "format: text}]", "train.max_steps=1"])
    run_training(plain)
    assert main(["chat", plain.output_dir, "--prompt", ""]) == 2
    assert "error: --prompt: the prompt is empty: give some text to continue" in capsys.readouterr().err
    with pytest.raises(DataError, match="prompt 0: the prompt is empty"):
        loraforge.generate(plain.output_dir, "")
