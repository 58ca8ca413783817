"""The fit planner: its batch model against what training really computed, and the CLI."""

import tempfile

import pytest
import torch

from loraforge.training.estimate import step_padded_tokens


@pytest.mark.parametrize("group_by_length", [True, False])
def test_padded_tokens_model_matches_training(train_tiny, group_by_length):
    from loraforge.data.build import build_datasets
    from loraforge.data.render import stop_token_ids
    from loraforge.model.load import load_tokenizer

    config, result = train_tiny("train.max_steps=10", "train.batch_size=3", "train.grad_accum=2",
                                f"train.group_by_length={str(group_by_length).lower()}", "data.val_fraction=0")
    tokenizer = load_tokenizer(config.model.name)
    lengths = [len(x) for x in build_datasets(config.data, tokenizer, stop_token_ids(tokenizer), config.seed).train["input_ids"]]
    assert len(lengths) == 24, "4 optimizer steps of 6 rows per epoch"
    predicted = step_padded_tokens(lengths, 3, 2, group_by_length, False, config.seed, 10)
    assert len(predicted) == 10
    if group_by_length:
        assert predicted == result.timing["step_padded_tokens"], "the same batches as training, across epochs"
    else:
        assert sum(predicted) == pytest.approx(sum(result.timing["step_padded_tokens"]), rel=0.25), "random order: same distribution"


@pytest.mark.parametrize("group_by_length", [True, False])
def test_a_step_that_would_accumulate_more_than_an_epoch_takes_the_epoch(train_tiny, group_by_length):
    """24 rows in batches of 4 are 6 batches an epoch; grad_accum 8 asks for more, and transformers ends each step
    at the epoch's end: every step computes one epoch's 6 batches, not 8."""
    from loraforge.data.build import build_datasets
    from loraforge.data.render import stop_token_ids
    from loraforge.model.load import load_tokenizer

    config, result = train_tiny("train.max_steps=3", "train.batch_size=4", "train.grad_accum=8",
                                f"train.group_by_length={str(group_by_length).lower()}", "data.val_fraction=0")
    tokenizer = load_tokenizer(config.model.name)
    lengths = [len(x) for x in build_datasets(config.data, tokenizer, stop_token_ids(tokenizer), config.seed).train["input_ids"]]
    assert len(lengths) == 24
    predicted = step_padded_tokens(lengths, 4, 8, group_by_length, False, config.seed, 3)
    trained = result.timing["step_padded_tokens"]
    assert len(trained) == 3 and sum(trained) >= 3 * sum(lengths)
    assert sum(predicted) == pytest.approx(sum(trained), rel=0.15), "an epoch a step (8 batches would be 4/3 more)"


@pytest.mark.parametrize("grad_accum", [8, 4, 2, 1])
def test_rows_of_one_length_are_priced_alike_in_any_order_and_process_count(grad_accum):
    """48 rows of 10 tokens in batches of 4 over 4 processes: 3 batches a process an epoch, so a step takes
    min(grad_accum, 3) of them whatever the order; the random-order and length-grouped models agree."""
    lengths = [10] * 48
    grouped = step_padded_tokens(lengths, 4, grad_accum, True, False, 0, 6, processes=4)
    random = step_padded_tokens(lengths, 4, grad_accum, False, False, 0, 6, processes=4)
    assert sum(random) == pytest.approx(sum(grouped))
    assert grouped[0] == 40 * min(grad_accum, 3)


def test_estimate_cli(tiny_model_dir, tmp_path, capsys):
    from loraforge.cli import main
    from tests.conftest import ECHO_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", ECHO_ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{sources: [{{path: {data}}}], cache: false}}\n"
                      "train: {max_steps: 50, batch_size: 4, eval_every: 10}\n")
    assert main(["estimate", str(config), "--probe-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "s per optimizer step" in out and "50 steps: about" in out and "MB process RSS" in out
    assert ("MB reserved by PyTorch" in out) == torch.cuda.is_available(), "GPU memory where the probe ran on a GPU"
    from loraforge.model.load import load_model_config
    from loraforge.model.precision import choose_precision

    auto = choose_precision("auto", load_model_config(str(tiny_model_dir))).chosen
    assert f"on this machine, in {auto}:" in out, "the planner measures in the precision training will pick"
    assert not (tmp_path / "runs").exists()


def test_a_signal_during_the_probe_stops_it_at_once_and_ends_the_estimate_in_one_line(tiny_model_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    """SIGTERM in the probe's second step: nothing of the probe is kept, so it stops there, not after finishing the
    step, its evaluation and a checkpoint (as a run does, which took a minute on a loaded machine). It printed
    train's message: the probe's temporary folder (already removed), a checkpoint and a resume command."""
    import os
    import signal

    from loraforge.cli import main
    from loraforge.training.trainer import SignalStop
    from tests.conftest import ECHO_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", ECHO_ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{sources: [{{path: {data}}}], cache: false}}\n"
                      "train: {max_steps: 50, batch_size: 4}\n")
    ended = []
    real_end = SignalStop.on_step_end

    def signal_as_step_two_begins(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def step_end(self, args, state, control, **kwargs):
        ended.append(state.global_step)
        return real_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(SignalStop, "on_step_begin", signal_as_step_two_begins, raising=False)
    monkeypatch.setattr(SignalStop, "on_step_end", step_end)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = signal.getsignal(signal.SIGTERM)
    assert main(["estimate", str(config), "--probe-steps", "4"]) == 143
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert said == ["error: no estimate: stopped by SIGTERM during its probe run; nothing is kept (the probe ran in a "
                    "temporary folder)"], err[-2000:]
    assert ended == [1], "the step the signal came in was not finished"
    assert "--resume" not in err and not list(tmp_path.glob("loraforge-estimate-*"))
    assert signal.getsignal(signal.SIGTERM) is before, "the probe's handlers are let go of"


def test_padded_tokens_of_the_busiest_process_follow_accelerates_sharding():
    """Two processes: the batches of the length-grouped order go to the processes in turn (accelerate's own shard
    of the batch sampler, used here as the reference), grad_accum of each process's a step; a step takes as long as
    the process with more tokens in it."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from loraforge.training.trainer import SeededLengthGroupedSampler

    batch_size, grad_accum, seed = 3, 2, 11
    for rows, steps in ((24, 2), (20, 2)):
        lengths = [5 + (i * 37) % 61 for i in range(rows)]
        per_process = []
        for rank in range(2):
            batches = BatchSampler(SeededLengthGroupedSampler(batch_size * grad_accum, lengths, seed), batch_size, False)
            tokens = [len(b) * max(lengths[i] for i in b) for b in BatchSamplerShard(batches, 2, rank)]
            per_process.append([sum(tokens[k : k + grad_accum]) for k in range(0, len(tokens), grad_accum)])
        # 24 rows: 8 batches of 3, 4 rounds over 2 processes; 20 rows: 7 batches, the last of 2 rows, which
        # accelerate completes, and an eighth made of rows from the epoch's start.
        assert len(per_process[0]) == steps
        busiest = [max(a, b) for a, b in zip(*per_process)]
        assert per_process[0] != per_process[1], "the processes' shares differ, so the busiest one matters"
        assert step_padded_tokens(lengths, batch_size, grad_accum, True, False, seed, steps, processes=2) == busiest
        assert step_padded_tokens(lengths, batch_size, grad_accum, True, False, seed, steps, processes=1) != busiest


def test_a_short_run_is_estimated_in_seconds_and_a_long_one_in_minutes():
    from loraforge.training.estimate import Estimate

    short = Estimate(0.5, 20.0, 900.0, 6, 400.0, 4, "fp32").summary()
    assert "6 steps: about 20 seconds in all, evaluations and model loading included" in short
    long = Estimate(1.4, 162.0, 2039.0, 100, 440.0, 4, "fp32").summary()
    assert "100 steps: about 2.7 minutes in all" in long


def test_a_packed_run_is_planned_from_its_packed_rows(train_tiny):
    """data.packing: train.batch_size counts packed rows, and an epoch has as many steps as those rows fill."""
    from loraforge.training.estimate import run_estimate

    config, result = train_tiny("data.packing=true", "data.max_length=128", "train.batch_size=2", "train.max_steps=null",
                                "train.num_epochs=1", "train.eval_every=1000", "data.val_fraction=0.1")
    trained = result.timing["step_padded_tokens"]
    planned = run_estimate(config.model_copy(update={"output_dir": config.output_dir + "-probe"}), probe_steps=3)
    assert planned.steps == len(trained) > 1
    assert planned.padded_tokens_per_step == pytest.approx(sum(trained) / len(trained), rel=1e-6)


@pytest.mark.parametrize("steps, every, bias", [(5, 2, "none"), (4, 2, "none"), (3, 5, "none"), (4, 2, "all")])
def test_the_planned_evaluations_and_sample_rounds_are_the_ones_training_runs(train_tiny, steps, every, bias):
    """The base model is evaluated after training with the adapter off, or, where that is not the base (trained
    biases), before training, inside the measured set-up time, where it is not counted again; so is the round of
    sample answers that evaluation gives. Every evaluation in training gives one."""
    import json
    from pathlib import Path

    from loraforge.training.estimate import evaluations, periodic_evaluations

    config, _ = train_tiny(f"train.max_steps={steps}", f"train.eval_every={every}", "train.save_every=null",
                           f"lora.bias={bias}")
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    in_set_up = int(bias != "none")
    assert sum("eval_loss" in r and r["step"] == 0 for r in records) == 1
    assert evaluations(config, steps, per_epoch=100) == sum("eval_loss" in r for r in records) - in_set_up
    rounds = [r["step"] for r in records if "samples" in r]
    assert rounds[:in_set_up] == [0] * in_set_up
    assert periodic_evaluations(config.train, steps, per_epoch=100) == len(rounds) - in_set_up


def test_process_counts_below_one_and_a_global_batch_the_processes_cannot_share_are_refused_before_launching(
        tmp_path, capsys, monkeypatch, tiny_model_dir):
    from loraforge.cli import main
    from loraforge.training import launch
    from tests.conftest import ECHO_ROWS, write_jsonl

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("torchrun was started"))
    data = write_jsonl(tmp_path / "d.jsonl", ECHO_ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{sources: [{{path: {data}}}], cache: false}}\n"
                      "train: {max_steps: 5, batch_size: 4, global_batch: 12}\n")
    for command in (["estimate", str(config), "--nproc", "0"], ["train", str(config), "--nproc", "-2"],
                    ["train", str(config), "--nnodes", "0"]):
        with pytest.raises(SystemExit) as stopped:
            main(command)
        assert stopped.value.code == 2
        assert "give 1 or more" in capsys.readouterr().err
    assert main(["estimate", str(config), "--nproc", "2"]) == 2
    assert "train.global_batch: 12 is not a multiple of train.batch_size 4 x 2 process(es)" in capsys.readouterr().err


@pytest.mark.parametrize("save_every", [3, None])
def test_the_work_after_the_last_step_is_planned_as_the_run_does_it(train_tiny, save_every):
    """A learning rate too small to change the weights gives equal evaluations at steps 3 and 6, so the best is step
    3: with a checkpoint there the run ends with it, evaluated once more; without one it ends with step 6. The plan
    counts that evaluation, the sample answers and the test split's rows and answers as the run has them."""
    import json
    from pathlib import Path

    from loraforge.training.estimate import run_estimate

    config, _ = train_tiny("train.learning_rate=1e-30", "train.eval_every=3", f"train.save_every={save_every or 'null'}",
                           "data.test_fraction=0.25", "eval.test_generations=4",
                           "eval.sample_prompts=[Echo red, Echo blue]")
    done = json.loads((Path(config.output_dir) / "eval.json").read_text())
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    planned = run_estimate(config.model_copy(update={"output_dir": config.output_dir + "-probe"}), probe_steps=3)
    during, after = planned.during, planned.after
    assert (during.rounds, during.answers) == (2, 4) == (sum("samples" in r for r in records),
                                                        sum(len(r.get("samples", [])) for r in records))
    assert during.seconds > 0
    assert "4 sample answers at 2 evaluations during training, in the total: " in planned.summary()
    assert after.best_evaluations == (done["weights"]["step"] != done["weights"]["of"]) == (save_every is not None)
    assert after.sample_answers == 2 * len(done["samples"]) == 4, "by the base (adapter off) and the run"
    assert (after.test_rows, after.test_answers) == (done["test"]["rows"], done["test"]["samples"]) == (6, 4)
    summary = planned.summary()
    assert "\n    4 sample answers: " in summary and "test split, 6 rows and 4 answers: " in summary
    assert ("the best checkpoint evaluated again" in summary) == (save_every is not None)
