"""Run lifecycle on the tiny llama: exact resume, signals, crashes and full disks while saving, NaN, tracking."""

import errno
import hashlib
import os
import re
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from loraforge import rundir
from loraforge.errors import ConfigError, RunDirError, TrainingStopped
from loraforge.config import load_config
from loraforge.rundir import complete_checkpoints
from loraforge.training.checkpoints import MARKER, latest_complete
from loraforge.training.run import run_training
from loraforge.training.trainer import CheckpointError, LoraforgeTrainer
from tests.conftest import ECHO_ROWS, ROOT, save_tiny_llama
from tests.training.conftest import losses


def adapter(run_dir):
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def ended_by(monkeypatch, config, replaced: tuple, error: type, match: str) -> Path:
    """Train with one attribute replaced ((owner, name, value)), which ends the run with `error`; the run's
    directory."""
    with monkeypatch.context() as patch:
        patch.setattr(*replaced)
        with pytest.raises(error, match=match):
            run_training(config)
    return Path(config.output_dir)


def stopped_by(monkeypatch, config, replaced: tuple, command: list[str]) -> TrainingStopped:
    """Train with one attribute replaced ((owner, name, value)), which stops the run; what it said."""
    with monkeypatch.context() as patch:
        patch.setattr(*replaced)
        with pytest.raises(TrainingStopped) as stopped:
            run_training(config, command=command)
    return stopped.value


def branch_from(straight_dir: Path, checkpoint_step: int, new_dir: Path) -> None:
    """A run directory as a run stopped right after checkpoint N would have left it."""
    new_dir.mkdir()
    shutil.copy(straight_dir / rundir.RESOLVED, new_dir / rundir.RESOLVED)
    records = [json.loads(l) for l in (straight_dir / rundir.METRICS).read_text().splitlines()]
    later = [r for r in records if r["step"] <= checkpoint_step + 1]
    (new_dir / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in later))
    (new_dir / rundir.CHECKPOINTS).mkdir()
    name = f"checkpoint-{checkpoint_step}"
    shutil.copytree(straight_dir / rundir.CHECKPOINTS / name, new_dir / rundir.CHECKPOINTS / name)


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.batch_size=2", "train.grad_accum=2"], ["data.packing=true", "data.max_length=64"]],
    ids=["plain", "grad-accum-2", "packing"],
)
def test_resumed_run_equals_straight_run(make_config, tmp_path, overrides):
    straight, _ = make_config("straight", *overrides)
    run_training(straight)
    straight_dir = Path(straight.output_dir)
    assert [c.name for c in complete_checkpoints(straight_dir / rundir.CHECKPOINTS)] == [
        "checkpoint-3", "checkpoint-6", "checkpoint-8"]

    resumed_dir = tmp_path / "resumed"
    branch_from(straight_dir, 3, resumed_dir)
    resumed, _ = make_config("resumed", *overrides)
    run_training(resumed, resume="auto")

    assert losses(resumed_dir) == losses(straight_dir), "same loss at every step (step 4 was logged twice: rewound)"
    a, b = adapter(straight_dir), adapter(resumed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical adapter weights"
    manifest = json.loads((resumed_dir / rundir.MANIFEST).read_text())
    assert manifest["resumed_from"].endswith("checkpoint-3")


def test_resume_in_the_second_epoch_equals_straight_run(make_config, tmp_path):
    straight, _ = make_config("straight2")
    run_training(straight)
    branch_from(Path(straight.output_dir), 6, tmp_path / "resumed2")
    resumed, _ = make_config("resumed2")
    run_training(resumed, resume=str(tmp_path / "resumed2" / rundir.CHECKPOINTS / "checkpoint-6"))
    assert losses(tmp_path / "resumed2") == losses(straight.output_dir), "18 rows / batch 4: step 6 is in epoch 2"
    a, b = adapter(straight.output_dir), adapter(tmp_path / "resumed2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_after_its_last_step_resumes_to_its_end_without_another_step(make_config, tmp_path):
    straight, _ = make_config("straight3")
    run_training(straight)
    branch_from(Path(straight.output_dir), 8, tmp_path / "resumed3")
    resumed, _ = make_config("resumed3")
    result = run_training(resumed, resume="auto")
    assert losses(tmp_path / "resumed3") == losses(straight.output_dir), "18 rows / batch 4: step 8 is mid-epoch"
    assert untimed(tmp_path / "resumed3") == untimed(straight.output_dir), "the summary of step 8 kept: none comes again"
    assert [c.name for c in complete_checkpoints(tmp_path / "resumed3" / rundir.CHECKPOINTS)] == ["checkpoint-8"]
    assert json.loads((tmp_path / "resumed3" / rundir.MANIFEST).read_text())["steps"] == 8
    a, b = adapter(straight.output_dir), adapter(tmp_path / "resumed3")
    assert all(torch.equal(a[k], b[k]) for k in a), "the last checkpoint's weights, no step more"
    assert result.eval_after == pytest.approx(json.loads((Path(straight.output_dir) / "eval.json").read_text())
                                               ["eval_loss_after"], rel=1e-6)


def test_a_torn_last_metrics_line_is_left_out_on_resume(make_config, tmp_path, caplog):
    straight, _ = make_config("straight4")
    run_training(straight)
    branch_from(Path(straight.output_dir), 3, tmp_path / "resumed4")
    with (tmp_path / "resumed4" / rundir.METRICS).open("a") as fh:
        fh.write('{"step": 5, "loss": 10.70')
    resumed, _ = make_config("resumed4")
    run_training(resumed, resume="auto")
    assert losses(tmp_path / "resumed4") == losses(straight.output_dir)
    assert f"{rundir.METRICS}:" in caplog.text and "not a whole record" in caplog.text


def test_a_run_directory_in_use_is_refused_to_a_second_process(make_config, tmp_path):
    straight, _ = make_config("straight5")
    run_training(straight)
    branch_from(Path(straight.output_dir), 3, tmp_path / "resumed5")
    resumed, _ = make_config("resumed5")
    with rundir.in_use(tmp_path / "resumed5"):
        with pytest.raises(RunDirError) as used:
            run_training(resumed, resume="auto")
    assert str(used.value) == (
        f"{tmp_path / 'resumed5'} is in use: another loraforge process is training in it; wait for it to end (or stop "
        f"it), then, if it does not complete, carry it on to its end with `loraforge train CONFIG "
        f"output_dir={tmp_path / 'resumed5'} --resume auto`")
    assert losses(tmp_path / "resumed5") == [r for r in losses(straight.output_dir) if r[0] <= 4], "nothing written"
    run_training(resumed, resume="auto")
    assert losses(tmp_path / "resumed5") == losses(straight.output_dir), "resumed once the other process let go"

    starting = tmp_path / "new6"
    starting.mkdir()
    (starting / rundir.CLAIM).write_text("")
    fresh, _ = make_config("new6")
    with rundir.in_use(starting):
        with pytest.raises(RunDirError, match=r"new6 is in use"):
            run_training(fresh)
    assert not (starting / rundir.RESOLVED).exists()


def test_resume_refuses_another_config_unless_allowed(make_config, caplog):
    config, _ = make_config("run")
    run_training(config)
    changed, _ = make_config("run", "train.learning_rate=0.02", "train.max_steps=9")
    run = Path(config.output_dir)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as info:
        run_training(changed, resume="auto")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "a refused resume changes no file"
    assert "train.learning_rate: 0.01 in the checkpoint's run, 0.02 now" in str(info.value)
    assert "--allow-changes" in str(info.value)
    more, _ = make_config("run", "train.max_steps=9", "train.learning_rate=0.02")
    run_training(more, resume="auto", allow_changes=True)
    assert losses(config.output_dir)[-1][0] == 9
    assert "with changes (--allow-changes):\n  train.learning_rate: 0.01 in the checkpoint's run, 0.02 now" in caplog.text


def test_a_run_extended_with_more_steps_takes_each_new_step_on_the_new_schedule(make_config):
    import math

    config, _ = make_config("extended", "train.lr_scheduler=cosine")
    run_training(config)
    longer, _ = make_config("extended", "train.lr_scheduler=cosine", "train.max_steps=12")
    run_training(longer, resume="auto", allow_changes=True)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (Path(config.output_dir) / rundir.METRICS).read_text()
                                               .splitlines()) if "lr" in r}
    for step in range(9, 13):
        assert rates[step] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 12)), rel=1e-6), step


def test_a_learning_rate_changed_on_resume_is_the_one_the_new_steps_take(make_config):
    import math

    config, _ = make_config("new-rate", "train.lr_scheduler=cosine", "train.max_steps=6", "train.weight_decay=0.0")
    run_training(config)
    changed, _ = make_config("new-rate", "train.lr_scheduler=cosine", "train.max_steps=10", "train.learning_rate=0.001",
                             "train.weight_decay=0.1")
    seen = {}
    from loraforge.training.trainer import ScheduleOnResume

    real = ScheduleOnResume.on_train_begin

    def spy(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        real(self, args, state, control, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)
        seen["decay"] = [group["weight_decay"] for group in optimizer.param_groups]

    ScheduleOnResume.on_train_begin = spy
    try:
        run_training(changed, resume="auto", allow_changes=True)
    finally:
        ScheduleOnResume.on_train_begin = real
    rates = {r["step"]: r["lr"] for r in map(json.loads, (Path(config.output_dir) / rundir.METRICS).read_text()
                                               .splitlines()) if "lr" in r}
    for step in range(7, 11):
        assert rates[step] == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 10)), rel=1e-6), step
    assert seen["decay"][0] == 0.1 and seen["decay"][-1] == 0.0


def test_resume_refuses_another_process_count_unless_allowed(make_config):
    from loraforge.training.checkpoints import read_marker
    from loraforge.training.resume import check_compatible

    config, _ = make_config("processes")
    run_training(config)
    checkpoint = latest_complete(Path(config.output_dir) / rundir.CHECKPOINTS)
    marker = read_marker(checkpoint)
    assert marker["processes"] == 1
    same = {"config": marker["config"], "data": marker["data"], "processes": 1, "precision": marker["precision"]}
    check_compatible(config, checkpoint, same, allow_changes=False)
    with pytest.raises(ConfigError, match=r"processes: 1 in the checkpoint's run, 2 now, which changes the global batch"):
        check_compatible(config, checkpoint, {**same, "processes": 2}, allow_changes=False)
    check_compatible(config, checkpoint, {**same, "processes": 2}, allow_changes=True)


def test_resume_refuses_other_data(make_config, tmp_path):
    config, _ = make_config("run")
    run_training(config)
    data = Path(config.data.sources[0].path)
    data.write_text(data.read_text() + json.dumps(ECHO_ROWS[0]) + "\n")
    longer, _ = make_config("run", "train.max_steps=9")
    with pytest.raises(ConfigError) as refused:
        run_training(longer, resume="auto", allow_changes=False)
    assert f"the data differs from the checkpoint's: {data} changed since the run read it" in str(refused.value)


def test_a_resume_may_change_what_the_run_logs_shows_and_how_often_it_checkpoints(make_config, monkeypatch):
    """logging.level, the sample answers, the trackers and the checkpoint cadence change no step of the run; each was
    refused as a config change, to be let through only with --allow-changes, which lets every real change through."""
    config, path = make_config("harmless")
    signal_during(monkeypatch, 4)
    with pytest.raises(TrainingStopped):
        run_training(config, command=[str(path)])
    monkeypatch.undo()
    changed, _ = make_config("harmless", "logging.level=DEBUG", "eval.max_new_tokens=3", "eval.sample_prompts=[Echo blue]",
                             "report_to=[tensorboard]", "train.save_every=2", "train.keep_last=2")
    run_training(changed, resume="auto")
    assert [step for step, _ in losses(config.output_dir)] == list(range(1, 9))
    assert load_config(Path(config.output_dir) / rundir.RESOLVED).eval.max_new_tokens == 3


def test_resume_needs_a_complete_checkpoint(make_config, tmp_path):
    config, _ = make_config("never")
    with pytest.raises(RunDirError, match="holds no run"):
        run_training(config, resume="auto")
    half = tmp_path / "never" / rundir.CHECKPOINTS / "checkpoint-3"
    half.mkdir(parents=True)
    with pytest.raises(RunDirError, match="not a complete checkpoint"):
        run_training(config, resume=str(half))
    with pytest.raises(RunDirError, match="no such checkpoint folder; use --resume auto"):
        run_training(config, resume=str(tmp_path / "never" / rundir.CHECKPOINTS / "checkpoint-9"))


def test_resume_from_a_folder_that_holds_checkpoints_names_them(make_config):
    """--resume RUN/checkpoints (or RUN) was told its checkpoint belonged to the run in RUN's parent folder."""
    config, _ = make_config("held", "train.max_steps=6")
    run_training(config)
    run = Path(config.output_dir)
    for given in (run / rundir.CHECKPOINTS, run):
        with pytest.raises(RunDirError) as refused:
            run_training(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 9})}),
                         resume=str(given))
        assert str(refused.value) == (f"--resume {given}: not a checkpoint folder (checkpoint-N); it holds "
                                      f"checkpoint-3, checkpoint-6: name one of them, or use --resume auto for the "
                                      f"newest complete checkpoint of {run}")


def test_a_checkpoint_of_another_run_is_refused_and_both_runs_stay_as_they_were(make_config, tmp_path):
    donor, _ = make_config("donor")
    run_training(donor)
    other, _ = make_config("other", "train.max_steps=3")
    run_training(other)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    foreign = Path(donor.output_dir) / rundir.CHECKPOINTS / "checkpoint-6"
    for name in ("other", "fresh"):
        target, _ = make_config(name, "train.max_steps=9")
        with pytest.raises(RunDirError) as info:
            run_training(target, resume=str(foreign))
        assert f"belongs to the run in {Path(donor.output_dir).resolve()}, not to output_dir" in str(info.value)
        assert f"output_dir={Path(donor.output_dir).resolve()}" in str(info.value) and "init_from" in str(info.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files, "no file written or changed"
    assert not (tmp_path / "fresh").exists()


def test_crash_while_saving_keeps_the_previous_checkpoint(make_config, monkeypatch, tmp_path):
    from transformers import Trainer

    config, _ = make_config("crash")
    real = Trainer._save_optimizer_and_scheduler
    calls = []

    def crash_on_second(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while writing optimizer.pt")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config)
    folder = Path(config.output_dir) / rundir.CHECKPOINTS
    assert [c.name for c in complete_checkpoints(folder)] == ["checkpoint-3"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3"], "nothing half-written left in place"

    # A hard kill cannot clean up: its leftover has no marker and is never resumed from.
    leftover = folder / ".staging-6" / "checkpoint-6"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    (folder / "checkpoint-7").mkdir()
    assert latest_complete(folder).name == "checkpoint-3"
    monkeypatch.undo()
    run_training(config, resume="auto")
    assert losses(config.output_dir)[-1][0] == 8
    assert not (folder / ".staging-6").exists(), "the resumed run's own save at step 6 replaced the leftover"
    assert (folder / "checkpoint-6" / MARKER).is_file()
    written = folder / "checkpoint-6" / "adapter_model.safetensors"
    assert written.read_bytes() != b"half" and load_file(written), "step 6 holds real weights, not the leftover"
    assert not (folder / "checkpoint-7" / MARKER).exists()


def test_disk_full_while_saving_is_a_clear_error(make_config, monkeypatch):
    import transformers.trainer as trainer_module

    config, _ = make_config("full-disk")
    real = torch.save
    saves = []

    def no_space_on_second_checkpoint(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            saves.append(f)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainer_module.torch, "save", no_space_on_second_checkpoint)
    with pytest.raises(CheckpointError) as info:
        run_training(config)
    message = str(info.value)
    assert "checkpoint-6" in message and "the disk is full" in message and "checkpoint-3" in message
    folder = Path(config.output_dir) / rundir.CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3"]


def test_nan_loss_stops_and_is_never_checkpointed(make_config, monkeypatch):
    from loraforge.training.trainer import LoraforgeTrainer

    config, _ = make_config("nan", "train.save_every=1")
    real = LoraforgeTrainer.compute_loss

    def poisoned_from_step_5(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step >= 4:
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(LoraforgeTrainer, "compute_loss", poisoned_from_step_5)
    with pytest.raises(TrainingStopped) as info:
        run_training(config)
    assert info.value.exit_code == 3
    assert "became NaN or inf at step 5" in str(info.value) and "checkpoint-4" in str(info.value)
    run = Path(config.output_dir)
    assert latest_complete(run / rundir.CHECKPOINTS).name == "checkpoint-4"
    assert not (run / rundir.ADAPTER).exists()
    assert any(r[0] == 5 and r[1] != r[1] for r in losses(run)), "the NaN is logged, not filtered out"
    assert str(info.value) in (run / rundir.LOG).read_text(), "the run's end is in train.log too"


def test_nan_patience_counts_steps_in_a_row_and_names_the_first(make_config, monkeypatch):
    from loraforge.training.trainer import LoraforgeTrainer

    config, _ = make_config("nan-patience", "train.nan_patience=2", "train.save_every=null")
    real = LoraforgeTrainer.compute_loss

    def nan_at_step_3_only(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step == 2 else loss

    monkeypatch.setattr(LoraforgeTrainer, "compute_loss", nan_at_step_3_only)
    with pytest.raises(TrainingStopped, match="at step 3"):
        run_training(config)
    logged = losses(config.output_dir)
    assert [step for step, loss in logged if loss != loss] == [3, 4], "step 3's update poisoned the weights"
    assert logged[-1][0] == 4, "patience 2: stopped after the second bad step in a row"


def test_epochs_with_evaluation_and_checkpoints_at_each_epoch_end(make_config):
    config, _ = make_config("epochs", "train.num_epochs=2", "train.eval_every=epoch", "train.save_every=epoch",
                            "train.warmup_steps=3", "train.eval_batch_size=2")
    assert config.train.max_steps is None, "the file's max_steps gives way to the override's num_epochs"
    run_training(config)
    run = Path(config.output_dir)
    assert [c.name for c in complete_checkpoints(run / rundir.CHECKPOINTS)] == ["checkpoint-3", "checkpoint-6"], \
        "18 training rows / (batch 4 x accumulation 2) = 3 steps an epoch"
    records = [json.loads(l) for l in (run / rundir.METRICS).read_text().splitlines()]
    assert sorted(r["step"] for r in records if "eval_loss" in r) == [0, 3, 6]
    assert losses(run)[-1][0] == 6
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[:4] == pytest.approx([0.0, 0.01 / 3, 0.02 / 3, 0.01]), "three warmup steps up to the peak"


def test_early_stopping(make_config):
    config, _ = make_config("early", "train.eval_every=1", "train.early_stopping.patience=2",
                            "train.early_stopping.min_delta=100")
    run_training(config)
    assert losses(config.output_dir)[-1][0] == 3, "no eval improves by 100, so the third evaluation stops it"


def test_a_resumed_run_carries_on_its_count_of_evaluations_without_improvement(make_config):
    settings = ["train.eval_every=1", "train.save_every=1", "train.early_stopping.patience=3",
                "train.early_stopping.min_delta=100"]
    config, _ = make_config("early-resumed", *settings, "train.max_steps=2")
    run_training(config)
    longer, _ = make_config("early-resumed", *settings)
    run_training(longer, resume="auto", allow_changes=True)
    assert losses(config.output_dir)[-1][0] == 4, "stopped at the same step as a run never stopped"


def test_the_best_checkpoint_is_the_default_adapter_and_says_so(make_config):
    config, _ = make_config("best", "train.save_every=1", "train.eval_every=1", "train.keep_last=2",
                            "train.learning_rate=0.05")
    assert config.train.load_best_at_end, "the default"
    result = run_training(config)
    run = Path(config.output_dir)
    records = [json.loads(l) for l in (run / rundir.METRICS).read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and r["step"] > 0}
    best_step = min(evals, key=evals.get)
    assert best_step != 8, "the test needs a best step before the last (lr 0.05 overshoots)"
    kept = {c.name for c in complete_checkpoints(run / rundir.CHECKPOINTS)}
    assert kept == {"checkpoint-7", "checkpoint-8", f"checkpoint-{best_step}"}
    assert result.eval_after == pytest.approx(evals[best_step], abs=1e-5)
    best = load_file(run / rundir.CHECKPOINTS / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    final = adapter(run)
    assert all(torch.equal(best[k], final[k]) for k in best), "RUN_DIR/adapter holds the best checkpoint's weights"
    said = f"step {best_step} of 8, the best eval_loss ({evals[best_step]:.4f})"
    assert f"Weights: {said}" in result.summary()
    assert f"Fine-tuned weights: {said}" in (run / rundir.REPORT).read_text()
    assert json.loads((run / rundir.EVAL).read_text())["weights"]["step"] == best_step

    last, _ = make_config("last", "train.save_every=1", "train.eval_every=1", "train.keep_last=2",
                          "train.learning_rate=0.05", "train.load_best_at_end=false")
    kept_last = run_training(last)
    assert kept_last.eval_after == pytest.approx(evals[8], abs=1e-5) and "Weights: step 8, the last" in kept_last.summary()


def test_a_best_evaluation_with_nothing_saved_is_warned_of(make_config, caplog):
    config, _ = make_config("unsaved", "train.save_every=null", "train.eval_every=1", "train.learning_rate=0.05")
    result = run_training(config)
    records = [json.loads(l) for l in (Path(config.output_dir) / rundir.METRICS).read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and r["step"] > 0}
    best_step = min(evals, key=evals.get)
    assert best_step != 8, "the same run as above: the best step comes before the last"
    assert "Weights: step 8, the last" in result.summary()
    assert (f"the best evaluation (step {best_step}, eval_loss {evals[best_step]:.4f}) fell on no checkpoint "
            "(train.save_every is null)") in caplog.text


def test_manifest_and_tensorboard(make_config, hashed):
    config, _ = make_config("tracked", "report_to=[tensorboard]")
    result = run_training(config)
    run = Path(config.output_dir)
    manifest = json.loads((run / rundir.MANIFEST).read_text())
    assert manifest["versions"]["torch"] == version("torch") and torch.__version__.startswith(manifest["versions"]["torch"])
    assert manifest["versions"]["loraforge"] == version("loraforge")
    assert manifest["seed"] == 42 and manifest["trainable_parameters"] > 0
    assert manifest["peak_memory"]["process_rss_mb"] > 0 and manifest["wall_seconds"] > 0
    assert manifest["hardware"]["cpu_count"]
    data = Path(config.data.sources[0].path).resolve()
    assert manifest["data_files"][config.data.sources[0].path] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert hashed[data] == 1, "the cache key and manifest.json, as the run starts and as it ends, share one read"
    events = list((run / rundir.TENSORBOARD).rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags, eval_points = set(), {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])
        if "eval/loss" in accumulator.Tags()["scalars"]:
            eval_points.update({e.step: e.value for e in accumulator.Scalars("eval/loss")})
    assert "train/loss" in tags and "eval/loss" in tags
    assert eval_points[0] == pytest.approx(result.eval_before, rel=1e-5), "the base evaluation is step 0"
    assert any(tag.startswith("samples") for tag in tags), "sample answers at each evaluation"


def _wait_for(path: Path, text: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
@pytest.mark.parametrize("sig, code", [pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(make_config, sig, code):
    config, path = make_config(f"signal-{sig.name}", "train.max_steps=400", "train.save_every=null", "train.eval_every=1000")
    overrides = [f"output_dir={config.output_dir}", "train.max_steps=400", "train.save_every=null", "train.eval_every=1000"]
    process = subprocess.Popen([sys.executable, "-m", "loraforge", "train", str(path), *overrides], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(Path(config.output_dir) / rundir.METRICS, '"loss"', timeout=120), "training started"
        process.send_signal(sig)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, err[-3000:]
    checkpoint = latest_complete(Path(config.output_dir) / rundir.CHECKPOINTS)
    assert checkpoint is not None and 0 < int(checkpoint.name.split("-")[1]) < 400
    assert f"stopped by {sig.name}" in err and str(checkpoint) in err
    printed = shlex.split(err.split("Resume with: ", 1)[1].splitlines()[0])
    assert printed == ["loraforge", "train", str(path), *overrides, "--resume", "auto"], "the command as it was started"
    if sig != signal.SIGTERM:
        return
    resumed = subprocess.run([sys.executable, "-m", "loraforge", *printed[1:]], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(config.output_dir)[-1][0] == 400


def test_a_global_batch_that_does_not_divide_is_refused(make_config):
    config, _ = make_config("indivisible", "train.global_batch=10", "train.batch_size=4")
    with pytest.raises(ConfigError, match=r"train.global_batch: 10 is not a multiple of train.batch_size 4 x 1"):
        run_training(config)
    assert not Path(config.output_dir).exists()


@pytest.mark.parametrize("setting", ["train.grad_accum=8", "train.global_batch=32"])
def test_accumulating_more_than_an_epoch_holds_prints_what_a_step_takes_and_warns(make_config, monkeypatch, caplog,
                                                                                  setting):
    import re

    from loraforge.training.trainer import LoraforgeTrainer

    rows_per_step = {}
    real = LoraforgeTrainer.training_step

    def counted(self, model, inputs, *args, **kwargs):
        step = self.state.global_step + 1
        rows_per_step[step] = rows_per_step.get(step, 0) + inputs["input_ids"].shape[0]
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(LoraforgeTrainer, "training_step", counted)
    config, _ = make_config("accumulated", setting, "train.max_steps=2", "train.save_every=null")
    caplog.set_level("INFO", logger="loraforge")
    run_training(config)
    printed = re.search(r"global batch: 4 per pass x (\d+) accumulated x 1 process\(es\) = (\d+) examples", caplog.text)
    assert printed and int(printed[2]) == rows_per_step[1] == rows_per_step[2], (printed, rows_per_step)
    key = setting.split("=")[0]
    assert f"{key}: 8 micro-batches accumulated per step, but an epoch of {rows_per_step[1]} training examples " \
           f"holds {printed[1]} of 4 per process, so each optimizer step takes one epoch" in caplog.text


def test_mlflow_names_from_the_config_and_its_keys_from_a_dotenv_beside_it(make_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from loraforge.cli import main

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")  # remembered as it was, so what the .env sets is undone after the test
        monkeypatch.delenv(name)
    store = tmp_path / "mlruns"
    config, path = make_config("mlflow")
    (path.parent / ".env").write_text(f"MLFLOW_TRACKING_URI={store.as_uri()}\nMLFLOW_ALLOW_FILE_STORE=true\n")
    assert main(["train", str(path), f"output_dir={config.output_dir}", "report_to=[mlflow]", "train.max_steps=2",
                 "train.save_every=null", "tracking.mlflow.experiment=loraforge-test",
                 "tracking.mlflow.run_name=tiny-echo"]) == 0
    import mlflow

    mlflow.set_tracking_uri(store.as_uri())
    runs = mlflow.search_runs(experiment_names=["loraforge-test"], output_format="list")
    assert len(runs) == 1 and runs[0].info.run_name == "tiny-echo"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    written = "".join(p.read_text(errors="replace") for p in Path(config.output_dir).rglob("*")
                      if p.is_file() and p.suffix in (".log", ".yaml", ".json", ".md", ".jsonl"))
    assert store.as_uri() not in written, "a .env value is never logged or recorded"


def test_wandb_offline(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, _ = make_config("wandb", "report_to=[wandb]", "train.max_steps=2", "train.save_every=null")
    run_training(config)
    offline = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


@pytest.mark.parametrize("tracker", ["wandb", pytest.param("mlflow", marks=pytest.mark.slow)])
def test_a_tracker_that_cannot_start_is_refused_before_the_run_directory_is_made(make_config, tmp_path, tracker):
    """In a process of its own: both libraries keep their login and store in globals that earlier tests set."""
    pytest.importorskip(tracker)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(NETRC=str(tmp_path / "no-netrc"), HOME=str(tmp_path))  # no `wandb login` on record
    if tracker == "mlflow":
        env["MLFLOW_TRACKING_URI"] = "./mlruns"  # a folder store, which mlflow 3 refuses unless told otherwise
    config, path = make_config("tracked")
    done = subprocess.run([sys.executable, "-m", "loraforge", "train", str(path), f"output_dir={config.output_dir}",
                           f"report_to=[{tracker}]"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    expected = {"wandb": "report_to: wandb cannot log in", "mlflow": "report_to: mlflow cannot open its tracking store"}
    assert done.returncode == 2 and expected[tracker] in done.stderr, done.stderr[-2000:]
    assert f"leave {tracker} out of report_to" in done.stderr and "Traceback" not in done.stderr
    assert not Path(config.output_dir).exists(), "refused before anything is written"


def test_init_from_trains_with_this_runs_lora_dropout(make_config):
    """The earlier run trained with dropout 0.1; this one asks for none, and gets none (not the adapter's 0.1)."""
    short = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2"]
    first, _ = make_config("first", *short)
    run_training(first)
    second, _ = make_config("second", *short, f"init_from={first.output_dir}", "lora.dropout=0.0")
    run_training(second)
    saved = json.loads((Path(second.output_dir) / "adapter" / "adapter_config.json").read_text())
    assert json.loads((Path(first.output_dir) / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert saved["lora_dropout"] == 0.0


def test_init_from_a_run_that_dropped_other_layers_or_no_run_is_refused_before_the_data_is_prepared(
        make_config, tmp_path, monkeypatch, capsys):
    """From the earlier run's files alone: `config validate` says it, and so does train before it reads the data."""
    from loraforge.cli import main
    from loraforge.training import run as run_module

    short = ["train.max_steps=1", "train.save_every=null", "model.variant=drop_layers"]
    first, _ = make_config("dropped-0", *short, "model.drop_layers=[0]")
    run_training(first)
    monkeypatch.setattr(run_module, "prepare", lambda *args, **kwargs: pytest.fail("the data was prepared first"))
    for init_from, drop, said in (
            (first.output_dir, "[1]", f"init_from: {first.output_dir} was trained on another setup "
                                      "(model.drop_layers [0] there, [1] here); use the same model and lora settings"),
            (tmp_path / "no-run", "[0]", f"init_from: {tmp_path / 'no-run'} is not a run directory")):
        overrides = [*short, f"model.drop_layers={drop}", f"init_from={init_from}"]
        second, path = make_config("second", *overrides)
        assert main(["config", "validate", str(path), *overrides]) == 2
        assert said in capsys.readouterr().err
        with pytest.raises(ConfigError) as refused:
            run_training(second)
        assert refused.value.problems[0].startswith(said)
        assert not Path(second.output_dir).exists()


def test_init_from_takes_the_same_model_folder_however_each_config_names_it(make_config, tiny_model_dir, tokenizer,
                                                                             tmp_path, monkeypatch):
    """The earlier run named the folder relative to where it ran (manifest.json's cwd); this one by its absolute path,
    or relative to another folder: one model. Another folder is another model, named by where it is."""
    monkeypatch.chdir(tiny_model_dir.parent)
    short = ["train.max_steps=1", "train.save_every=null", f"model.name={tiny_model_dir.name}"]
    first, _ = make_config("relative", *short)
    run_training(first)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in (str(tiny_model_dir), os.path.relpath(tiny_model_dir)):
        rundir.check_init_from(make_config("second", f"model.name={name}", f"init_from={first.output_dir}")[0])
    other = save_tiny_llama(tmp_path / "other-llama", tokenizer)
    with pytest.raises(ConfigError) as refused:
        rundir.check_init_from(make_config("third", f"model.name={other}", f"init_from={first.output_dir}")[0])
    assert f"(model.name {str(tiny_model_dir.resolve())!r} there, {str(other)!r} here)" in refused.value.problems[0]


def terminated(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)


_training_step = LoraforgeTrainer.training_step


def crash_in_step_2(self, *args, **kwargs):
    if self.state.global_step == 1:
        raise RuntimeError("the machine went away")
    return _training_step(self, *args, **kwargs)


def loss_events(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / rundir.TENSORBOARD))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_sigterm_while_loading_or_evaluating_first_says_what_the_run_left(make_config, monkeypatch):
    """SIGTERM before training (the data, the model, a preference run's first evaluation) ends with one line and
    143, as SIGTERM in training does; it killed the process without a word."""
    from loraforge.training import evaluation
    from loraforge.training import run as run_module

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the handler loraforge found")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        loading, path = make_config("sigterm-loading")
        stopped = stopped_by(monkeypatch, loading, (run_module, "prepare", terminated), [str(path)])
        assert stopped.exit_code == 143
        assert str(stopped) == (f"stopped by SIGTERM before training. The run had not started writing to "
                                f"{loading.output_dir}: start it again with the same command.")
        assert signal.getsignal(signal.SIGTERM) is unhandled, "the caller's handler is back"

        evaluating, _ = make_config("sigterm-evaluating", "lora.bias=all")
        stopped = stopped_by(monkeypatch, evaluating, (evaluation, "evaluate_before", terminated), [str(path)])
        assert stopped.exit_code == 143
        assert str(stopped) == (f"stopped by SIGTERM before training. No complete checkpoint was written: start the "
                                f"run again with: loraforge train {path} (it starts over in {evaluating.output_dir}).")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_run_stopped_before_its_first_checkpoint_starts_over_in_its_directory(make_config, monkeypatch):
    """A run stopped in its first evaluation, started again with the same command, crashes in step 2 of the 3 before
    its first checkpoint; the same command starts over from step 0. The directory held nothing to go on from, only
    what loraforge wrote, and the command was refused with "delete it". `--resume auto` has nothing to resume and
    says so, keeping the metrics (a run without checkpoints, killed, has no other record); it started over without
    a word but a warning, and in a directory another process still loads in it said the run had stopped."""
    from loraforge.training import evaluation

    config, path = make_config("started-over", "report_to=[tensorboard]")
    run = Path(config.output_dir)
    stopped_by(monkeypatch, config, (evaluation, "evaluate_before", terminated), [str(path)])
    ended_by(monkeypatch, config, (LoraforgeTrainer, "training_step", crash_in_step_2), RuntimeError, "went away")
    assert sorted(p.name for p in run.iterdir()) == sorted(set(rundir.BEFORE_CHECKPOINTS) - {rundir.MANIFEST_STAGED})
    assert [step for step, _ in losses(run)] == [1]
    with rundir.in_use(run), pytest.raises(RunDirError) as used:
        run_training(config, resume="auto")
    assert str(used.value) == (
        f"{run} is in use: another loraforge process is training in it; wait for it to end (or stop it), then, if it "
        f"stops before its first checkpoint, start it over with `loraforge train CONFIG output_dir={run}`, without "
        "--resume")
    with pytest.raises(RunDirError) as refused:
        run_training(config, resume="auto")
    assert str(refused.value) == (
        f"--resume auto: nothing to resume in {run}: its run stopped before its first checkpoint. The same command "
        "without --resume starts over in it, replacing that run's metrics.jsonl and TensorBoard events and carrying "
        "on its train.log")
    assert [step for step, _ in losses(run)] == [1] and loss_events(run) == [1]
    (run / rundir.MANIFEST_STAGED).write_text('{"cwd": ', encoding="utf-8")
    run_training(config)

    assert not (run / rundir.MANIFEST_STAGED).exists(), "a manifest.json cut short as it was written is loraforge's"
    assert [step for step, _ in losses(run)] == list(range(1, 9)), "the stopped runs' records gone"
    assert loss_events(run) == list(range(1, 9))
    stopped, crashed, complete = (run / rundir.LOG).read_text().split(
        "---- the run above stopped before its first checkpoint; a new run starts over in this directory ----\n")
    assert "trainable parameters" in stopped and "step 1/8" not in stopped
    assert "step 1/8" in crashed and "step 2/8" not in crashed
    assert "step 8/8" in complete and "checkpoint-3" not in stopped + crashed


def test_a_run_in_a_directory_named_by_time_that_stopped_before_its_first_checkpoint_says_how_to_start_over_there(
        make_config, monkeypatch, tmp_path):
    """The command printed names the directory {time} was filled in with: the same command makes another one."""
    from loraforge.config import load_config
    from loraforge.training import evaluation

    config, path = make_config("runs/{time}")
    stopped = stopped_by(monkeypatch, config, (evaluation, "evaluate_before", terminated),
                         [str(path), f"output_dir={config.output_dir}"])
    (run,) = (tmp_path / "runs").iterdir()
    printed = shlex.join(["loraforge", "train", str(path), f"output_dir={config.output_dir}", f"output_dir={run}"])
    assert str(stopped) == (f"stopped by SIGTERM before training. No complete checkpoint was written: start the run "
                            f"again with: {printed} (it starts over in {run}).")
    run_training(load_config(path, shlex.split(printed)[3:]))
    assert list((tmp_path / "runs").iterdir()) == [run] and (run / rundir.ADAPTER).is_dir()


def test_a_start_over_stopped_midway_is_started_over_again(make_config, monkeypatch):
    """Ctrl-C while a new start clears a dead run's files leaves resolved.yaml, the sign of what the directory holds,
    to the last; a directory cleared up to it (as the start over removing it first left it) is started over in
    again. The next run took it as its own and appended to the dead run's metrics and TensorBoard events."""
    config, path = make_config("midway", "report_to=[tensorboard]")
    run = Path(config.output_dir)
    ended_by(monkeypatch, config, (LoraforgeTrainer, "training_step", crash_in_step_2), RuntimeError, "went away")
    unlink = Path.unlink

    def interrupted_at_the_metrics(self, *args, **kwargs):
        if self.name == rundir.METRICS:
            raise KeyboardInterrupt
        return unlink(self, *args, **kwargs)

    stopped = stopped_by(monkeypatch, config, (Path, "unlink", interrupted_at_the_metrics), [str(path)])
    assert stopped.exit_code == 130 and "start the run again" in str(stopped)
    assert (run / rundir.RESOLVED).is_file() and [step for step, _ in losses(run)] == [1]

    (run / rundir.RESOLVED).unlink()
    run_training(config)
    assert [step for step, _ in losses(run)] == list(range(1, 9))
    assert loss_events(run) == list(range(1, 9))


def test_a_run_directory_without_a_checkpoint_is_refused_while_it_holds_files_loraforge_did_not_write(make_config,
                                                                                                      monkeypatch):
    from loraforge.training import evaluation

    config, path = make_config("stopped")
    run = Path(config.output_dir)
    stopped_by(monkeypatch, config, (evaluation, "evaluate_before", terminated), [str(path)])
    left = sorted(p.name for p in run.rglob("*"))
    for theirs in (run / "notes.txt", run / rundir.CHECKPOINTS / "notes.txt"):
        theirs.write_text("mine")
        with pytest.raises(RunDirError, match="already holds a run"):
            run_training(config)
        with pytest.raises(RunDirError, match="--resume auto: no complete checkpoint"):
            run_training(config, resume="auto")
        with pytest.raises(RunDirError) as unfinished:
            rundir.read_config(run)
        assert str(unfinished.value).endswith(
            f"if it stopped, start it again with another output_dir (no checkpoint holds it to carry on from, and "
            f"{run} holds more than a run writes before its first checkpoint)"), "the same command is refused"
        assert theirs.read_text() == "mine"
        theirs.unlink()
    with rundir.in_use(run), pytest.raises(RunDirError) as used:
        run_training(config)
    assert str(used.value).endswith(f"then, if it stops before its first checkpoint, start it over with `loraforge "
                                    f"train CONFIG output_dir={run}`, without --resume")
    assert sorted(p.name for p in run.rglob("*")) == left


def test_a_stopped_run_directory_whose_names_are_links_or_of_another_kind_is_refused(make_config, monkeypatch,
                                                                                     tmp_path):
    """Only what loraforge writes is started over in, each name the file or folder a run writes, not a link: a
    checkpoints/ linked to a folder shared with another run lost that run's checkpoint in progress, a train.log
    linked to someone's file was appended to, and a metrics.jsonl or train.log that is a folder (of the user's
    files) ended the run in a traceback."""
    from loraforge.training import evaluation

    config, path = make_config("stopped")
    stopped_by(monkeypatch, config, (evaluation, "evaluate_before", terminated), [str(path)])
    shared = tmp_path / "shared" / f"{rundir.STAGING}checkpoint-3"
    shared.mkdir(parents=True)
    (shared / "adapter_model.safetensors").write_text("another run's")
    (tmp_path / "notes.txt").write_text("mine")

    def replaced(name: str, make) -> Callable[[Path], None]:
        def change(run: Path) -> None:
            shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
            make(run / name)
        return change

    changes = {"checkpoints linked": replaced(rundir.CHECKPOINTS, lambda p: p.symlink_to(shared.parent)),
               "train.log linked": replaced(rundir.LOG, lambda p: p.symlink_to(tmp_path / "notes.txt")),
               "metrics.jsonl a folder": replaced(rundir.METRICS, Path.mkdir),
               "train.log a folder": replaced(rundir.LOG, lambda p: (p.mkdir(), (p / "mine.txt").write_text("mine")))}
    for name, change in changes.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(config.output_dir, run, symlinks=True)
        change(run)
        files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(RunDirError, match="already holds a run"):
            run_training(make_config(run.name)[0])
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files, name


def test_ctrl_c_while_loading_or_finishing_says_what_the_run_left(make_config, monkeypatch):
    from loraforge.training import run as run_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    loading, path = make_config("ctrl-c-loading")
    stopped = stopped_by(monkeypatch, loading, (run_module, "prepare", interrupt), [str(path)])
    assert stopped.exit_code == 130
    assert str(stopped) == (f"interrupted. The run had not started writing to {loading.output_dir}: start it "
                            "again with the same command.")

    finishing, _ = make_config("ctrl-c-finishing")
    stopped = stopped_by(monkeypatch, finishing, (run_module, "finish_run", interrupt),
                         [str(path), f"output_dir={finishing.output_dir}"])
    last = latest_complete(Path(finishing.output_dir) / rundir.CHECKPOINTS)
    assert str(stopped) == (f"interrupted. Last complete checkpoint: {last}. Resume with: loraforge train "
                            f"{path} output_dir={finishing.output_dir} --resume auto")
    run_training(finishing, resume="auto")
    assert (Path(finishing.output_dir) / rundir.ADAPTER).is_dir(), "the printed command finishes the run"


def test_with_patience_no_checkpoint_is_written_from_weights_a_nan_step_updated(make_config, monkeypatch):
    from loraforge.training.trainer import LoraforgeTrainer

    config, _ = make_config("nan-patient", "train.nan_patience=3", "train.save_every=1")
    real = LoraforgeTrainer.compute_loss

    def poisoned_from_step_3(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step >= 2 else loss

    monkeypatch.setattr(LoraforgeTrainer, "compute_loss", poisoned_from_step_3)
    with pytest.raises(TrainingStopped, match="at step 3") as info:
        run_training(config)
    run = Path(config.output_dir)
    assert latest_complete(run / rundir.CHECKPOINTS).name == "checkpoint-2" and "checkpoint-2" in str(info.value)


def test_precision_auto_resumes_in_the_dtype_the_run_trained_in(make_config, monkeypatch):
    from loraforge.model import precision as precision_module
    from loraforge.training.checkpoints import read_marker

    config, _ = make_config("auto-kept", "precision=auto", "train.max_steps=3")
    run_training(config)
    run = Path(config.output_dir)
    trained_in = read_marker(latest_complete(run / rundir.CHECKPOINTS))["precision"]
    other = "fp32" if trained_in == "bf16" else "bf16"
    monkeypatch.setattr(precision_module, "choose_cpu", lambda requested, model_config=None: pytest.fail(
        f"measured again; it would pick {other} on a busy machine"))
    longer, _ = make_config("auto-kept", "precision=auto", "train.max_steps=5")
    result = run_training(longer, resume="auto", allow_changes=True)
    assert result.precision == trained_in
    monkeypatch.undo()
    forced, _ = make_config("auto-kept", f"precision={other}", "train.max_steps=6")
    with pytest.raises(ConfigError, match=f"precision: {trained_in} in the checkpoint's run, {other} now"):
        run_training(forced, resume="auto")


def test_the_last_step_is_logged_when_it_is_not_a_multiple_of_logging_steps(make_config):
    config, _ = make_config("last-logged", "train.logging_steps=4", "train.max_steps=6")
    run_training(config)
    assert [step for step, _ in losses(config.output_dir)] == [4, 6]


TIMINGS = {"tokens_per_s", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
           "train_samples_per_second", "train_steps_per_second"}


def untimed(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rundir.read_metrics(Path(run_dir) / rundir.METRICS)]


def scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    """The steps of each scalar tag in the run's TensorBoard events, as TensorBoard shows them (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / rundir.TENSORBOARD))
    events.Reload()
    return {tag: sorted(e.step for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def test_a_run_stopped_between_logs_and_resumed_writes_the_metrics_and_curves_of_a_straight_run(make_config,
                                                                                                monkeypatch):
    from loraforge.eval.plots import read_loss_series

    straight, _ = make_config("straight", "train.logging_steps=2", "report_to=[tensorboard]")
    run_training(straight)
    config, _ = make_config("stopped", "train.logging_steps=2", "report_to=[tensorboard]")
    with monkeypatch.context() as patch:
        signal_during(patch, 5)
        with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 5"):
            run_training(config)
    run = Path(config.output_dir)
    assert [r["step"] for r in rundir.read_metrics(run / rundir.METRICS) if "train_loss" in r] == [5], "its summary"
    run_training(config, resume="auto")

    summaries = [r["step"] for r in rundir.read_metrics(run / rundir.METRICS) if "train_loss" in r]
    assert summaries == [8], "one end-of-training summary, the run's"
    assert untimed(run) == untimed(straight.output_dir), "step 6's loss averages steps 5 and 6; train_loss all 8"
    assert read_loss_series(run / rundir.METRICS) == read_loss_series(Path(straight.output_dir) / rundir.METRICS)
    assert (run / rundir.LOSS_PLOT).read_bytes() == (Path(straight.output_dir) / rundir.LOSS_PLOT).read_bytes()
    assert scalar_steps(run)["train/train_loss"] == [8], "the stopped session's summary was left at step 5"
    assert scalar_steps(run) == scalar_steps(straight.output_dir)


def test_a_run_that_crashed_after_its_checkpoint_shows_one_curve_in_tensorboard_once_resumed(make_config,
                                                                                             monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loraforge.training.trainer import LoraforgeTrainer

    def curves(run_dir):
        events = EventAccumulator(str(Path(run_dir) / rundir.TENSORBOARD))
        events.Reload()
        return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in ("train/loss", "eval/loss")}

    straight, _ = make_config("straight", "report_to=[tensorboard]")
    run_training(straight)
    real = LoraforgeTrainer.training_step

    def crash_in_step_6(self, *args, **kwargs):
        if self.state.global_step == 5:
            raise RuntimeError("the machine went away")
        return real(self, *args, **kwargs)

    config, _ = make_config("crashed", "report_to=[tensorboard]")
    run = ended_by(monkeypatch, config, (LoraforgeTrainer, "training_step", crash_in_step_6), RuntimeError,
                   "the machine went away")
    assert latest_complete(run / rundir.CHECKPOINTS).name == "checkpoint-3"
    assert [s for s, _ in curves(run)["train/loss"]] == [1, 2, 3, 4, 5], "steps 4 and 5 logged past the checkpoint"
    run_training(config, resume="auto")

    assert len(list((run / rundir.TENSORBOARD).glob("events.out.tfevents.*"))) > 1, "each session wrote its own file"
    assert curves(run) == curves(straight.output_dir), "steps 4 and 5 once, the resumed session's"


def test_a_signal_mid_epoch_saves_once_and_does_not_evaluate_the_cut_epoch(make_config, monkeypatch):
    from loraforge.training.trainer import SignalStop

    real = SignalStop.on_step_end

    def signalled_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2:
            self.received = "SIGTERM"
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(SignalStop, "on_step_end", signalled_at_step_2)
    config, _ = make_config("signal-epochs", "train.num_epochs=2", "train.eval_every=epoch", "train.save_every=epoch")
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM"):
        run_training(config)
    run = Path(config.output_dir)
    records = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    assert 2 not in [r["step"] for r in records if "eval_loss" in r], "no evaluation of the epoch the signal cut short"
    written = [line for line in (run / rundir.LOG).read_text().splitlines() if line.endswith("checkpoint-2 written")]
    assert len(written) == 1, written


def test_resuming_from_a_checkpoint_a_run_already_went_on_from_is_refused(make_config):
    config, _ = make_config("went-on")
    run_training(config)
    run = Path(config.output_dir)
    before = sorted(p.name for p in (run / rundir.CHECKPOINTS).iterdir())
    longer, _ = make_config("went-on", "train.max_steps=10")
    with pytest.raises(RunDirError, match="checkpoint-6, checkpoint-8 went on from it already"):
        run_training(longer, resume=str(run / rundir.CHECKPOINTS / "checkpoint-3"), allow_changes=True)
    assert sorted(p.name for p in (run / rundir.CHECKPOINTS).iterdir()) == before


def test_early_stopping_without_a_validation_split_says_it_cannot_stop(make_config, caplog):
    config, _ = make_config("early-blind", "data.val_fraction=0", "train.early_stopping.patience=2", "train.max_steps=2")
    run_training(config)
    assert "train.early_stopping.patience 2: this run has no validation split" in caplog.text


def signal_during(monkeypatch, step: int, name: str = "SIGTERM"):
    """SignalStop as if `name` arrived while `step` was training."""
    from loraforge.training.trainer import SignalStop

    real = SignalStop.on_step_end

    def signalled(self, args, state, control, **kwargs):
        if state.global_step == step:
            self.received = name
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(SignalStop, "on_step_end", signalled)


def evaluations(run_dir):
    records = [json.loads(l) for l in (Path(run_dir) / rundir.METRICS).read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


@pytest.mark.parametrize("settings, signalled", [
    (["train.eval_every=1", "train.save_every=1", "train.learning_rate=0.05"], "best"),
    (["train.eval_every=1", "train.save_every=1", "train.early_stopping.patience=2",
      "train.early_stopping.min_delta=100"], 2),
    (["train.num_epochs=2", "train.eval_every=epoch", "train.save_every=epoch", "train.learning_rate=0.05"], 3),
], ids=["best-checkpoint", "early-stopping", "epoch-end"])
def test_a_signal_during_a_step_due_an_evaluation_resumes_to_the_straight_runs_end(make_config, monkeypatch, settings,
                                                                                  signalled):
    straight, _ = make_config("straight", *settings)
    expected = run_training(straight)
    step = expected.weights["step"] if signalled == "best" else signalled
    assert step in evaluations(straight.output_dir) and step < expected.weights["of"], \
        "the signal falls on an evaluated step before the last"
    config, path = make_config("signalled", *settings)
    with monkeypatch.context() as patch:
        signal_during(patch, step)
        with pytest.raises(TrainingStopped, match=f"stopped by SIGTERM after step {step}"):
            run_training(config, command=[str(path)])
    assert step in evaluations(config.output_dir), "evaluated before the stop's checkpoint"
    result = run_training(config, resume="auto")
    assert evaluations(config.output_dir) == pytest.approx(evaluations(straight.output_dir), rel=1e-6)
    assert {k: v for k, v in result.weights.items() if k != "checkpoint"} == \
        {k: v for k, v in expected.weights.items() if k != "checkpoint"}, "the same step's weights chosen"
    a, b = adapter(straight.output_dir), adapter(config.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the same weights at the end"


def test_an_epoch_counted_run_signalled_at_its_last_step_mid_epoch_resumes_without_another_step(make_config,
                                                                                              monkeypatch):
    straight, _ = make_config("straight", "train.num_epochs=1.5")
    assert straight.train.max_steps is None
    run_training(straight)
    last = losses(straight.output_dir)[-1][0]
    assert last % 3, "3 steps an epoch: the last step of 1.5 epochs is in the middle of the second"
    config, path = make_config("signalled", "train.num_epochs=1.5")
    with monkeypatch.context() as patch:
        signal_during(patch, last)
        with pytest.raises(TrainingStopped, match=rf"after training \(step {last}\): .* Write them with: "):
            run_training(config, command=[str(path)])
    run_training(config, resume="auto")
    assert losses(config.output_dir) == losses(straight.output_dir)
    assert json.loads((Path(config.output_dir) / rundir.MANIFEST).read_text())["steps"] == last
    a, b = adapter(straight.output_dir), adapter(config.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the last checkpoint's weights, no step more"


EARLY_AT_3 = ["train.eval_every=1", "train.early_stopping.patience=2", "train.early_stopping.min_delta=100"]


@pytest.mark.parametrize("settings, last", [([], 8), (EARLY_AT_3, 3)], ids=["last-step", "stopped-early"])
def test_a_signal_as_training_returns_after_its_last_step_writes_the_weights_and_says_what_is_left(make_config,
                                                                                                   monkeypatch,
                                                                                                   settings, last):
    """SIGTERM after the last step (of the run, or where early stopping ended it), while train() winds up: the run
    is trained, so its weights are written and the line says how to evaluate them (it said "checkpoint None
    written. Resume with ...", and resuming found none)."""
    from loraforge.training.trainer import LoraforgeTrainer

    real = LoraforgeTrainer.train

    def signalled_as_it_returns(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    config, _ = make_config("returning", "train.save_every=null", *settings)
    run_dir = re.escape(config.output_dir)
    said = rf"stopped by SIGTERM after training \(step {last}\).* evaluate the weights with: loraforge eval {run_dir}$"
    run = ended_by(monkeypatch, config, (LoraforgeTrainer, "train", signalled_as_it_returns), TrainingStopped, said)
    assert adapter(run) and not (run / rundir.EVAL).exists()
    assert latest_complete(run / rundir.CHECKPOINTS) is None


def test_a_run_early_stopping_ended_resumes_after_a_signal_without_another_step(make_config, monkeypatch):
    """Early stopping ends the run at step 3; SIGTERM in its final evaluation. The command the line prints finishes
    the run from checkpoint-3 (it trained step 4 and wrote that step's weights over the adapter it called
    complete)."""
    from loraforge.training import evaluation

    settings = [*EARLY_AT_3, "train.save_every=1"]
    straight, _ = make_config("straight", *settings)
    run_training(straight)
    assert [step for step, _ in losses(straight.output_dir)] == [1, 2, 3], "stopped early at step 3 of 8"
    real = evaluation.evaluate_after

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def killed(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    config, _ = make_config("stopped", *settings)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        ended_by(monkeypatch, config, (evaluation, "evaluate_after", signalled), TrainingStopped,
                 r"after training \(step 3\): .* Write them with: ")
    finally:
        signal.signal(signal.SIGTERM, previous)
    written = adapter(config.output_dir)
    run_training(config, resume="auto")
    assert losses(config.output_dir) == losses(straight.output_dir)
    assert json.loads((Path(config.output_dir) / rundir.MANIFEST).read_text())["steps"] == 3
    assert all(torch.equal(written[k], adapter(config.output_dir)[k]) for k in written)

    with pytest.raises(RunDirError, match="already complete: early stopping ended it at step 3 .*raise "
                                          r"train.early_stopping.patience above 2, or set it to null"):
        run_training(config, resume="auto")
    patient, _ = make_config("stopped", *settings, "train.early_stopping.patience=null")
    run_training(patient, resume="auto", allow_changes=True)
    assert [step for step, _ in losses(config.output_dir)] == list(range(1, 9)), "without early stopping, to step 8"


@pytest.mark.parametrize("stage, settings, rest", [
    ("evaluate_after", [], "Write them with: loraforge train"),
    ("sample_answers", ["train.save_every=null"], "No checkpoint holds step 8 to finish the run from"),
], ids=["final-evaluation", "sample-answers-no-checkpoint"])
def test_sigterm_after_training_says_what_was_written_and_what_writes_the_rest(make_config, monkeypatch, stage,
                                                                               settings, rest):
    """A real SIGTERM to this process in the run's last stages. The test's own handler stands for the default one,
    which would end the process without a word."""
    from loraforge.training import evaluation

    real = getattr(evaluation, stage)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    class Killed(Exception):
        pass

    def killed(signum, frame):
        raise Killed

    config, path = make_config("finishing", *settings)
    command = [str(path), f"output_dir={config.output_dir}"]
    run = Path(config.output_dir)
    monkeypatch.setattr(evaluation, stage, signalled)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(TrainingStopped) as stopped:
            run_training(config, command=command)
    finally:
        signal.signal(signal.SIGTERM, previous)
    message = str(stopped.value)
    assert stopped.value.exit_code == 143 and "\n" not in message
    assert message.startswith(f"stopped by SIGTERM after training (step 8): {run / rundir.ADAPTER} is complete; the "
                              "final evaluation, sample answers, eval.json, report.md and the rest of manifest.json "
                              f"were not written. {rest}"), message
    assert message in (run / rundir.LOG).read_text()
    written = adapter(run)
    assert written and not any((run / name).exists() for name in (rundir.EVAL, rundir.REPORT))
    started = rundir.read_manifest(run)
    assert started.keys() == {"data_files", "cwd", "precision"}, "as the run started"
    assert rundir.trained_precision(run) in ("fp32", "bf16"), "chat and eval compute it as it trained"
    if "save_every=null" in " ".join(settings):
        assert message.endswith(f"evaluate the weights with: loraforge eval {run}")
        return
    assert message.endswith(f"Write them with: loraforge train {shlex.join(command)} --resume auto")
    monkeypatch.undo()
    result = run_training(config, resume="auto")
    assert result.eval_after is not None and "steps" in rundir.read_manifest(run) and (run / rundir.REPORT).is_file()
    assert rundir.read_manifest(run)["precision"]["chosen"] == started["precision"]["chosen"]
    assert all(torch.equal(written[k], adapter(run)[k]) for k in written), "the weights the stopped run wrote"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_once_the_run_is_complete_leaves_it_complete(make_config, monkeypatch, capsys, sig):
    """SIGTERM or Ctrl-C once the run's last file is written, as its result is made and as it lets go of its signals
    (then of its run directory and train.log): the run is complete, so train prints its summary and exits 0. It said
    "stopped by SIGTERM before training" (143), or "interrupted" (130), of a finished run."""
    from loraforge.cli import main
    from loraforge.training import evaluation
    from loraforge.training.trainer import SignalStop

    def signalled_after(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            signal.raise_signal(sig)
            return result
        return call

    def killed(signum, frame):
        raise AssertionError("SIGTERM reached the default handler")

    overrides = ["train.max_steps=2", "train.save_every=null"]
    config, path = make_config("complete", *overrides)
    monkeypatch.setattr(evaluation, "metric_values", signalled_after(evaluation.metric_values))
    monkeypatch.setattr(SignalStop, "uninstall", signalled_after(SignalStop.uninstall))
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        code = main(["train", str(path), f"output_dir={config.output_dir}", *overrides])
    finally:
        signal.signal(signal.SIGTERM, previous)
    printed = capsys.readouterr()
    assert code == 0 and "error:" not in printed.err, printed.err
    assert printed.out.startswith(f"Run directory: {config.output_dir}")
    assert all((Path(config.output_dir) / name).is_file() for name in (rundir.EVAL, rundir.REPORT, rundir.MANIFEST))


def test_a_run_that_starts_again_keeps_nothing_its_earlier_session_completed_in_its_manifest(make_config):
    """A finished run carried on to more steps rewrites manifest.json as it starts: until it completes the file again,
    the steps, wall time and versions of its earlier session are not there to be read as this session's."""
    from loraforge.training.manifest import write_start

    config, _ = make_config("extended")
    run = Path(config.output_dir)
    run.mkdir(parents=True)
    (run / rundir.MANIFEST).write_text(json.dumps({"steps": 4, "wall_seconds": 9.5, "cwd": "/gone",
                                                   "precision": {"chosen": "bf16"}}), encoding="utf-8")
    write_start(run, config, {"requested": "fp32", "chosen": "fp32", "reason": "asked for"})
    started = rundir.read_manifest(run)
    assert started.keys() == {"data_files", "cwd", "precision"} and started["cwd"] == os.getcwd()
    assert rundir.trained_precision(run) == "fp32"
    assert sorted(p.name for p in run.iterdir()) == [rundir.MANIFEST], "written whole, nothing staged left"


def test_a_run_directory_on_a_file_system_without_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with pytest.raises(RunDirError) as refused, rundir.in_use(tmp_path):
        pass
    assert str(refused.value) == (f"{tmp_path / rundir.CLAIM} cannot be locked (No locks available), so this process "
                                  f"cannot keep others from training in {tmp_path}; choose an output_dir on a file "
                                  "system that supports locks (flock)")


@pytest.mark.parametrize("placed", ["link to a file", "link to nothing", "second name of a file"])
def test_the_claim_is_never_written_through_a_name_placed_where_it_goes(tmp_path, monkeypatch, placed):
    """What another process puts under the claim's name after ensure_free looked is not written to: create() followed
    a link there (making the file it named) and truncated a file it found."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    run = tmp_path / "run"
    claim = run / rundir.CLAIM
    place = {"link to a file": lambda: claim.symlink_to(notes),
             "link to nothing": lambda: claim.symlink_to(tmp_path / "elsewhere"),
             "second name of a file": lambda: os.link(notes, claim)}[placed]
    ensure_free = rundir.ensure_free

    def then_placed(output_dir):
        free = ensure_free(output_dir)
        run.mkdir()
        place()
        return free

    monkeypatch.setattr(rundir, "ensure_free", then_placed)
    if placed.startswith("link"):
        with pytest.raises(RunDirError) as refused:
            rundir.create(run)
        assert str(refused.value) == (f"{claim} is a link, not the file loraforge writes to claim {run}; move it out "
                                      f"of {run} and run again: loraforge writes its own there, and never writes to "
                                      "or locks a file it did not write")
    else:
        assert rundir.create(run) == run
    assert notes.read_text() == "mine\n" and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]

    monkeypatch.undo()
    assert rundir.create(tmp_path / "plain") == tmp_path / "plain"
    assert (tmp_path / "plain" / rundir.CLAIM).read_text() == "A run directory written by loraforge.\n"


def fake_checkpoint(run: Path, step: int, marked: bool) -> Path:
    """checkpoints/checkpoint-{step} with the files resuming reads, and its COMPLETE marker where marked."""
    checkpoint = run / rundir.CHECKPOINTS / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"):
        (checkpoint / name).write_text(name)
    if marked:
        sizes = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
        (checkpoint / MARKER).write_text(json.dumps({"step": step, "sizes": sizes}))
    return checkpoint


def test_carry_on_advice_takes_only_a_checkpoint_resume_takes_and_says_alike_everywhere(tmp_path):
    """A checkpoint-N folder without its COMPLETE marker (a copy cut short, a marker removed), or marked with a file
    it needs gone, is nothing --resume auto takes: read_config, ensure_free and in_use told to carry the run on from
    it, while the resume advice of a stopped run said no checkpoint was written."""
    from loraforge.training.resume import carry_on

    run = tmp_path / "run"
    run.mkdir()
    for name in (rundir.CLAIM, rundir.RESOLVED, rundir.METRICS):
        (run / name).write_text("")
    fake_checkpoint(run, 3, marked=False)
    (fake_checkpoint(run, 4, marked=True) / "optimizer.pt").unlink()

    def advice() -> dict[str, str]:
        said = {"stopped": carry_on(run, None)}
        for name, refuse in (("read_config", rundir.read_config), ("ensure_free", rundir.ensure_free)):
            with pytest.raises(RunDirError) as refused:
                refuse(run)
            said[name] = str(refused.value)
        with rundir.in_use(run), pytest.raises(RunDirError) as used:
            rundir.refuse_in_use(run)
        said["in_use"] = str(used.value)
        return said

    said = advice()
    assert said["stopped"] == (f"No complete checkpoint was written, so there is nothing to resume: delete {run} and "
                               "start the run again, or start it with another output_dir.")
    assert said["read_config"].endswith(
        f"if it stopped, start it again with another output_dir (no checkpoint holds it to carry on from, and {run} "
        "holds more than a run writes before its first checkpoint)")
    assert said["ensure_free"].endswith("delete the old one.")
    assert said["in_use"].endswith(f"then, if it stops before its first checkpoint, start it again with another "
                                   f"output_dir (no checkpoint holds it to carry on from, and {run} holds more than "
                                   "a run writes before its first checkpoint)")
    assert all("--resume auto" not in line for line in said.values())

    checkpoint = fake_checkpoint(run, 2, marked=True)
    said = advice()
    assert said["stopped"] == (f"Last complete checkpoint: {checkpoint}. Resume with: loraforge train CONFIG "
                               f"output_dir={run} --resume auto")
    assert said["read_config"].endswith(f"it stopped at or after checkpoint-2: carry it on to its end with `loraforge "
                                        f"train CONFIG output_dir={run} --resume auto`")
    assert said["ensure_free"].endswith("To carry it on from its newest checkpoint, add --resume auto.")
    assert said["in_use"].endswith(f"then, if it does not complete, carry it on to its end with `loraforge train "
                                   f"CONFIG output_dir={run} --resume auto`")


def test_a_run_directory_with_links_in_place_of_its_files_is_not_carried_on_through_them(make_config, monkeypatch,
                                                                                        tmp_path):
    """Resume appended the log to, and rewrote the metrics over, the files that links in place of train.log and
    metrics.jsonl point to: refused, naming the links. A link to a folder (checkpoints on another disk) is
    followed. (A start over refuses any link: the test above.)"""
    config, path = make_config("linked", "train.max_steps=9", "train.save_every=3")
    run = Path(config.output_dir)
    signal_during(monkeypatch, 4)
    with pytest.raises(TrainingStopped):
        run_training(config, command=[str(path)])
    monkeypatch.undo()
    precious = {name: tmp_path / f"precious-{name}" for name in (rundir.LOG, rundir.METRICS)}
    for name, target in precious.items():
        target.write_text("the user's own\n")
        (run / name).unlink()
        (run / name).symlink_to(target)
    with pytest.raises(RunDirError) as refused:
        run_training(config, resume="auto")
    assert str(refused.value) == (
        f"{run} holds links in place of the files loraforge writes there (metrics.jsonl, train.log); carrying on the "
        "run would write through them into the files they point to: put a copy of each file in place of its link "
        '(cp --remove-destination "$(readlink -f LINK)" LINK), or remove the link')
    assert all(target.read_text() == "the user's own\n" for target in precious.values())

    (run / rundir.LOG).unlink()
    (run / rundir.METRICS).unlink()
    (run / rundir.METRICS).write_text("")
    elsewhere = tmp_path / "other-disk"
    shutil.move(run / rundir.CHECKPOINTS, elsewhere)
    (run / rundir.CHECKPOINTS).symlink_to(elsewhere)
    run_training(config, resume="auto")
    assert (elsewhere / "checkpoint-9").is_dir()


def test_a_signal_while_a_checkpoint_is_written_stops_the_run_at_that_checkpoint(make_config, monkeypatch):
    """SIGTERM during step 3's checkpoint: the run trained step 4 and wrote checkpoint-4 before it stopped, a step
    and a save more than the stop needs (a SLURM grace period may not have them)."""
    real = LoraforgeTrainer._save_checkpoint

    def signalled_while_saving(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.state.global_step == 3:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(LoraforgeTrainer, "_save_checkpoint", signalled_while_saving)
    config, path = make_config("saving", "train.save_every=3")
    with pytest.raises(TrainingStopped) as stopped:
        run_training(config, command=[str(path)])
    run = Path(config.output_dir)
    checkpoint = run / rundir.CHECKPOINTS / "checkpoint-3"
    assert str(stopped.value).startswith(f"stopped by SIGTERM after step 3; checkpoint {checkpoint} written. Resume")
    assert [c.name for c in complete_checkpoints(run / rundir.CHECKPOINTS)] == ["checkpoint-3"]
    assert [step for step, _ in losses(run)] == [1, 2, 3]
    monkeypatch.undo()
    straight, _ = make_config("saving-straight", "train.save_every=3")
    run_training(straight)
    run_training(config, resume="auto")
    resumed, whole = losses(run), losses(straight.output_dir)
    assert [step for step, _ in resumed] == [step for step, _ in whole] == list(range(1, 9))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], rel=1e-5), "as a straight run"
