"""Progress figures of a resumed run: tokens/s and ETA count this process's steps, not the run it carries on."""

import json

from transformers import TrainerState, TrainingArguments

from loraforge.training import callbacks
from loraforge.training.callbacks import MetricsCallback, ThroughputCallback


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_resumed_run_reports_the_speed_and_eta_of_its_own_steps(tmp_path, monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    # As the Trainer hands it over after loading checkpoint-30 of a 40-step run: 30 steps and 30,000 tokens done.
    state = TrainerState(global_step=30, max_steps=40, num_input_tokens_seen=30_000)
    throughput = ThroughputCallback()
    metrics = MetricsCallback(tmp_path / "metrics.jsonl", throughput)
    throughput.on_train_begin(args, state, None)
    for _ in range(2):
        throughput.on_step_begin(args, state, None)
        clock.now += 2.0
        state.global_step += 1
        state.num_input_tokens_seen += 500
        throughput.on_step_end(args, state, None)
    logs = {"loss": 1.5, "learning_rate": 1e-4}
    throughput.on_log(args, state, None, logs=logs)
    with caplog.at_level("INFO", logger="loraforge.train"):
        metrics.on_log(args, state, None, logs=logs)

    assert throughput.tokens_per_s == 250.0, "1,000 tokens in 4 s, not 31,000"
    assert throughput.session_tokens_per_s(state) == 250.0
    assert throughput.eta_seconds(state) == 16.0, "8 steps left at the 2 s a step this process measured"
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["tokens_per_s"] == 250.0 and record["tokens_seen"] == 31_000
    assert "step 32/40" in caplog.text and "250 tok/s  ETA 16s" in caplog.text


def test_a_fresh_run_counts_from_zero(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = TrainerState(global_step=0, max_steps=10, num_input_tokens_seen=0)
    throughput = ThroughputCallback()
    throughput.on_train_begin(args, state, None)
    assert throughput.eta_seconds(state) is None and throughput.session_tokens_per_s(state) is None
    throughput.on_step_begin(args, state, None)
    clock.now += 1.0
    state.global_step, state.num_input_tokens_seen = 1, 300
    throughput.on_step_end(args, state, None)
    throughput.on_log(args, state, None, logs={"loss": 2.0})
    assert throughput.tokens_per_s == 300.0 and throughput.eta_seconds(state) == 9.0
