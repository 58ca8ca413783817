"""method: dpo on the tiny llama: it trains against the starting model, reports rewards and preference accuracy,
resumes exactly, starts from an SFT run's adapter (init_from), stops on NaN, and its run works with eval, merge
and chat like an SFT run's."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge import rundir
from loraforge.config import load_config
from loraforge.errors import ConfigError, TrainingStopped
from loraforge.eval.preference import preference_line
from loraforge.training.run import run_training
from tests.conftest import ECHO_ROWS, write_jsonl
from tests.training.test_lifecycle import branch_from

COLOURS = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]
PAIRS = [{"prompt": f"Echo {w}" + "!" * n, "chosen": f"{w} {w}", "rejected": f"no {o}"}
         for n in range(3) for w, o in zip(COLOURS, COLOURS[1:] + COLOURS[:1])]


def dpo_config_maker(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    path = tmp_path / "dpo.yaml"
    path.write_text(
        f"""
model: {{name: {tiny_model_dir}}}
method: dpo
lora: {{r: 4, alpha: 8}}
data: {{sources: [{{path: {pairs}, format: preference}}], val_fraction: 0.25, cache: false}}
train: {{max_steps: 6, batch_size: 4, learning_rate: 0.02, eval_every: 3, save_every: 3, logging_steps: 1,
         warmup_ratio: 0.0, keep_last: 10}}
eval: {{sample_prompts: [Echo red], max_new_tokens: 2}}
report_to: []
""",
        encoding="utf-8",
    )

    def make(name, *overrides):
        return load_config(path, [f"output_dir={tmp_path / name}", *overrides]), path

    return make


@pytest.fixture
def make_dpo(tmp_path, tiny_model_dir):
    return dpo_config_maker(tmp_path, tiny_model_dir)


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / rundir.METRICS).read_text().splitlines()]


def adapter(run_dir, sub=""):
    return load_file(Path(run_dir) / rundir.ADAPTER / sub / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    """One DPO run on the tiny llama, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("dpo-run")
    # fp32: its tests compare training's figures with `loraforge eval`'s, which loads in fp32, and auto picks bf16
    # even for the tiny model's probe on some CPUs with native bf16.
    config, _ = dpo_config_maker(folder, tiny_model_dir)("dpo", "precision=fp32")
    return config, run_training(config)


def test_dpo_learns_the_preference_and_reports_it(dpo_run):
    config, result = dpo_run
    run = Path(config.output_dir)
    logged = records(run)
    train_steps = [r for r in logged if "rewards/margins" in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4, 5, 6], "rewards logged at every step"
    evals = [r for r in logged if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 3, 6], "evaluated before (the starting model) and during training"
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4), "policy = reference at the start"
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_rewards/margins"] > 0

    found = json.loads((run / rundir.EVAL).read_text())["preference"]
    final = next(r for r in evals if r["step"] == result.weights["step"])
    assert found["pairs"] == 6 and found["preference_accuracy"] > 0.5 and found["reward_margin"] > 0
    assert found["chosen_more_likely"] >= found["chosen_more_likely_start"]
    assert result.preference == found and "Validation pairs: preference accuracy" in result.summary()
    assert "perplexity" not in result.metrics, "a DPO loss is not a language-model loss"
    report = (run / rundir.REPORT).read_text()
    assert f"| reward accuracy | 0.000 | {final['eval_rewards/accuracies']:.3f} |" in report
    assert f"## Held-out preference (validation split)\n\n{preference_line(found)}" in report
    assert (run / rundir.LOSS_PLOT).is_file()
    assert not (run / rundir.ADAPTER / rundir.REFERENCE).exists(), "the reference is the base, adapter off: no copy"


@pytest.mark.parametrize("method", ["dpo", *(pytest.param(m, marks=pytest.mark.slow) for m in ("kto", "orpo"))])
def test_a_preference_run_stopped_between_logs_logs_what_a_straight_run_logs(tmp_path, tiny_model_dir, monkeypatch,
                                                                              method):
    """SIGTERM at step 3 of 6, logging every 2 steps, then resumed: the metrics and adapter of a straight run. Step
    4's record averages steps 3 and 4 in TRL's own metrics (rewards, log-probabilities, logits) as in its loss, and
    counts the tokens of the whole run, as a straight run's does (they covered step 4 alone, and the resumed session's
    tokens); the starting model's metrics survive the resume; the adapter weights are bit-identical."""
    from tests.training.test_lifecycle import signal_during, untimed

    make = dpo_config_maker(tmp_path, tiny_model_dir)
    settings = [f"method={method}", "train.logging_steps=2", "train.max_steps=6", "train.eval_every=6"]
    if method == "kto":
        settings.append("data.sources[0].format=preference")
    straight, _ = make("straight", *settings)
    run_training(straight)
    config, _ = make("stopped", *settings)
    with monkeypatch.context() as patch:
        signal_during(patch, 3)
        with pytest.raises(TrainingStopped, match="after step 3"):
            run_training(config)
    run_training(config, resume="auto")
    step_4 = [r for r in untimed(straight.output_dir) if r["step"] == 4 and "loss" in r][0]
    assert len(step_4) > 4, "TRL logs metrics of its own beside the loss"
    def logged(run_dir):
        return [{k: v for k, v in r.items() if not k.endswith("_time")} for r in untimed(run_dir)]

    assert logged(config.output_dir) == logged(straight.output_dir)
    before = lambda run: json.loads((Path(run) / rundir.EVAL).read_text())["metrics_before"]  # noqa: E731
    assert before(config.output_dir) == before(straight.output_dir), "the starting model's metrics survive resume"
    a, b = adapter(straight.output_dir), adapter(config.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical adapter weights"


def assert_resume_equals_a_straight_run(tmp_path, tiny_model_dir, overrides: list[str], logged: tuple[str, ...]):
    """A run of 4 steps, and one resumed from its step-2 checkpoint: the same logged values, bit-identical adapters."""
    make = dpo_config_maker(tmp_path, tiny_model_dir)
    short = [*overrides, "train.max_steps=4", "train.save_every=2", "train.eval_every=4"]
    straight, _ = make("straight", *short)
    run_training(straight)
    branch_from(Path(straight.output_dir), 2, tmp_path / "resumed")
    resumed, _ = make("resumed", *short)
    run_training(resumed, resume="auto")
    values = lambda run: [(r["step"], *(r[k] for k in logged)) for r in records(run) if "loss" in r]  # noqa: E731
    assert values(tmp_path / "resumed") == values(straight.output_dir)
    a, b = adapter(straight.output_dir), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical adapter weights"


@pytest.mark.slow
def test_sft_then_dpo_from_its_adapter(make_dpo, tmp_path, tiny_model_dir):
    echo = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    sft = load_config(make_dpo("unused")[1], [
        f"output_dir={tmp_path / 'sft'}", "method=sft", f"data.sources=[{{path: {echo}, format: messages}}]"])
    run_training(sft)
    dpo, _ = make_dpo("dpo-from-sft", f"init_from={sft.output_dir}")
    run_training(dpo)
    start, reference, tuned = adapter(sft.output_dir), adapter(dpo.output_dir, rundir.REFERENCE), adapter(dpo.output_dir)
    assert start.keys() == reference.keys() and all(torch.equal(start[k], reference[k]) for k in start), (
        "the reference is the SFT model")
    assert any(not torch.equal(start[k], tuned[k]) for k in start), "and DPO trained on from it"
    first_eval = next(r for r in records(dpo.output_dir) if "eval_rewards/accuracies" in r)
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-4), (
        "at step 0 the policy is the SFT model, the same as the reference")

    other = tmp_path / "other-base"
    from tests.conftest import save_tiny_llama
    from loraforge.model.load import load_tokenizer

    save_tiny_llama(other, load_tokenizer(str(tiny_model_dir)), seed=1)
    mismatched, _ = make_dpo("mismatched", f"init_from={sft.output_dir}", f"model.name={other}")
    with pytest.raises(ConfigError, match="init_from: .* was trained on another setup \\(model.name"):
        run_training(mismatched)
    other_rank, _ = make_dpo("other-rank", f"init_from={sft.output_dir}", "lora.r=8")
    with pytest.raises(ConfigError, match="lora.r 4 there, 8 here"):
        run_training(other_rank)


def test_a_nan_loss_stops_a_dpo_run_without_checkpointing_it(make_dpo, monkeypatch):
    from loraforge.training.preference_trainer import PreferenceTrainer

    config, _ = make_dpo("nan", "train.save_every=1")
    real = PreferenceTrainer.compute_loss

    def poisoned_from_step_3(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step >= 2 else loss

    monkeypatch.setattr(PreferenceTrainer, "compute_loss", poisoned_from_step_3)
    with pytest.raises(TrainingStopped, match="became NaN or inf at step 3"):
        run_training(config)
    assert sorted(p.name for p in (Path(config.output_dir) / rundir.CHECKPOINTS).iterdir()) == [
        "checkpoint-1", "checkpoint-2"]


def test_eval_merge_and_chat_work_on_a_dpo_run(dpo_run, capsys):
    import loraforge
    from loraforge.chat import run_chat
    from loraforge.eval.run import format_results, run_eval
    from loraforge.export.merge import run_merge

    run = Path(dpo_run[0].output_dir)
    results = run_eval(run)
    written = json.loads((run / "eval" / "validation.json").read_text())["preference"]
    assert f"preference accuracy {written['preference_accuracy']:.3f} (starting model 0.5)" in format_results(results)
    assert written == pytest.approx(json.loads((run / rundir.EVAL).read_text())["preference"]), (
        "eval of the saved run (adapter and adapter/ref) measures what training measured")
    assert loraforge.evaluate(run).metrics == {"preference": pytest.approx(written)}, "the Python API returns them"
    merged = run_merge(run)
    assert (merged.out_dir / "config.json").is_file() and merged.max_abs_logit_diff < 1e-3
    capsys.readouterr()
    run_chat(run, prompt="Echo red", max_new_tokens=2)
    assert capsys.readouterr().out.strip(), "chat answers"


@pytest.mark.parametrize("overrides, expected", [
    (["method=sft"], "the data is preference data, which method sft does not train; set method: dpo"),
    (["adapter=full"], "method dpo needs adapter: lora"),
    (["train.best_metric=eval_accuracy"], "is not a metric a dpo run reports"),
    (["lora.bias=all"], "lora.bias all trains biases of the base, which the reference shares"),
    (["lora.dropout=0.1"], "lora.dropout 0.1: method dpo runs without dropout"),
])
def test_contradictory_preference_settings_are_config_errors(make_dpo, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        make_dpo("never", *overrides)


def test_dpo_on_chat_data_names_the_format_it_needs(make_dpo, tmp_path):
    echo = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    with pytest.raises(ConfigError, match=r"method dpo needs data in format preference"):
        make_dpo("never", f"data.sources=[{{path: {echo}, format: messages}}]")


@pytest.mark.parametrize("overrides", [pytest.param(["lora.use_dora=true"], marks=pytest.mark.slow), ["quantization=4bit"]],
                         ids=["dora", "qlora-4bit"])
def test_dpo_trains_dora_and_qlora_adapters(make_dpo, overrides):
    config, _ = make_dpo("variant", "train.max_steps=2", "train.eval_every=2", "train.save_every=null", *overrides)
    result = run_training(config)
    steps = [r for r in records(config.output_dir) if "rewards/margins" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert result.preference["pairs"] == 6
    tuned = adapter(config.output_dir)
    assert any(v.abs().sum() > 0 for k, v in tuned.items() if "lora_B" in k), "the adapter moved"
    assert {v.dtype for v in tuned.values()} == {torch.float32}, "the adapter trains in fp32, as in an SFT run"


def test_the_planner_predicts_the_padded_tokens_of_dpo_steps(make_dpo):
    from loraforge.training.estimate import _train_lengths, step_padded_tokens

    config, _ = make_dpo("planned", "train.max_steps=5", "train.batch_size=3", "train.grad_accum=2",
                         "data.val_fraction=0", "train.eval_every=1000", "train.save_every=null")
    result = run_training(config)
    lengths = _train_lengths(config)
    assert len(lengths) == 24
    predicted = step_padded_tokens(lengths, 3, 2, True, False, config.seed, 5)
    assert [2 * t for t in predicted] == result.timing["step_padded_tokens"], (
        "length-grouped pairs, chosen and rejected padded to one length: the same batches as training")
