"""Trainer callbacks: metrics.jsonl, a one-line-per-log progress report with tokens/s and ETA, and TensorBoard."""

import json
import logging
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from loraforge.eval.generate import generate_batch, prompt_text

log = logging.getLogger("loraforge.train")

_RENAMES = {"learning_rate": "lr"}
_DROP = {"num_input_tokens_seen", "train_tokens_per_second", "total_flos", "train_runtime"}


class ThroughputCallback(TrainerCallback):
    """Times optimizer steps only (evaluation excluded) and counts real, non-pad tokens; also when training began
    and when its first step was done, for the planner and the bench. A resumed run counts from where it resumed:
    the steps and tokens of the run it carries on took time this process did not measure."""

    def __init__(self):
        self.train_began_at: float | None = None
        self.train_seconds = 0.0
        self._step_start = None
        self._last_tokens = 0
        self._last_seconds = 0.0
        self.tokens_per_s: float | None = None
        self.first_step_done_at: float | None = None
        self.step_seconds: list[float] = []
        self.tokens_at_start = 0
        self.step_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_began_at = time.perf_counter()
        self.tokens_at_start = self._last_tokens = state.num_input_tokens_seen
        self.step_at_start = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_start is not None:
            self.step_seconds.append(time.perf_counter() - self._step_start)
            self.train_seconds += self.step_seconds[-1]
            self._step_start = None
        if self.first_step_done_at is None:
            self.first_step_done_at = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        tokens = state.num_input_tokens_seen
        seconds = self.train_seconds - self._last_seconds
        if "loss" in (logs or {}) and seconds > 0:
            self.tokens_per_s = (tokens - self._last_tokens) / seconds
            self._last_tokens, self._last_seconds = tokens, self.train_seconds

    def eta_seconds(self, state) -> float | None:
        done = state.global_step - self.step_at_start
        if done <= 0:
            return None
        return (state.max_steps - state.global_step) * self.train_seconds / done

    def session_tokens_per_s(self, state) -> float | None:
        """Real tokens per second of training over this process's steps."""
        if not self.train_seconds:
            return None
        return (state.num_input_tokens_seen - self.tokens_at_start) / self.train_seconds


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per log event to metrics.jsonl and prints a progress line. The last step is logged
    too when it is not a multiple of logging_steps, so the curves and the progress reach the end."""

    def __init__(self, path: Path, throughput: ThroughputCallback):
        self.path = Path(path)
        self.throughput = throughput

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step}
        for key, value in logs.items():
            if key not in _DROP:
                record[_RENAMES.get(key, key)] = value
        training = "loss" in logs
        if training and self.throughput.tokens_per_s is not None:
            record["tokens_per_s"] = round(self.throughput.tokens_per_s, 1)
        record["tokens_seen"] = state.num_input_tokens_seen
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if training:
            eta = self.throughput.eta_seconds(state)
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %s tok/s  ETA %s",
                state.global_step,
                state.max_steps,
                logs["loss"],
                logs.get("learning_rate", 0.0),
                f"{self.throughput.tokens_per_s:.0f}" if self.throughput.tokens_per_s else "-",
                _duration(eta),
            )
        elif "eval_loss" in logs and state.max_steps:
            log.info("step %d/%d  eval loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class SampleCallback(TrainerCallback):
    """At each evaluation, answers a few prompts with the model as it is, into metrics.jsonl and TensorBoard; the
    seconds each round took, for the planner."""

    def __init__(self, path: Path, chats: list[str | list[dict]], max_new_tokens: int, stop_ids):
        self.path = Path(path)
        self.chats = chats
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.tensorboard = None
        self.seconds: list[float] = []

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.chats or model is None or not state.is_world_process_zero:
            return
        started = time.perf_counter()
        answers = generate_batch(model, processing_class, self.chats, self.max_new_tokens, self.stop_ids)
        samples = [{"prompt": prompt_text(c), "answer": a} for c, a in zip(self.chats, answers)]
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": state.global_step, "samples": samples}) + "\n")
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            text = "\n\n".join(f"**{s['prompt']}**\n\n{s['answer']}" for s in samples)
            writer.add_text("samples", text, state.global_step)
        model.train()
        self.seconds.append(time.perf_counter() - started)


class ResumedTensorBoard(TensorBoardCallback):
    """transformers' TensorBoard callback whose writer, in a run resumed from step N, starts with a purge from step
    N+1: TensorBoard hides what the stopped session logged after its checkpoint, so each tag is one curve. The
    end-of-training summary (train_loss, train_runtime, ...) of a session a signal stopped before the run's last step
    is not written: it would sit at N, before the purge, where no straight run has one (metrics.jsonl drops it on
    resume). `stop` is the run's SignalStop."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stop.stopping and state.global_step < state.max_steps and "train_loss" in (logs or {}):
            return
        super().on_log(args, state, control, logs=logs, **kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tb_writer is None and state.global_step > 0:
            self.tb_writer = SummaryWriter(log_dir=self.logging_dir, purge_step=state.global_step + 1)
        super().on_train_begin(args, state, control, **kwargs)
