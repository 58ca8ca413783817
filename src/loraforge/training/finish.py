"""Finish stage: what a finished run leaves in its directory (adapter or model, tokenizer, eval.json, loss
curves, report.md, manifest.json) and the summary printed at the end."""

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import rundir
from loraforge.config import RunConfig
from loraforge.eval.plots import plot_loss
from loraforge.eval.preference import held_out_kind, preference_line
from loraforge.eval.report import write_report
from loraforge.model.template import save_for_plain_use
from loraforge.rundir import step_of
from loraforge.training.checkpoints import latest_complete
from loraforge.training.evaluation import metric_values
from loraforge.training.manifest import write_manifest

OUTPUTS = (
    (rundir.ADAPTER + "/", "LoRA adapter (peft.PeftModel.from_pretrained loads it)"),
    (rundir.MODEL + "/", "the fully fine-tuned model (transformers loads it)"),
    (rundir.LABELS, "label names in id order"),
    (rundir.TOKENIZER + "/", "tokenizer with its chat template"),
    (rundir.RESOLVED, "the full config this run used"),
    (rundir.METRICS, "loss, learning rate and tokens/s per logged step"),
    (rundir.EVAL, "eval loss before and after, sample answers"),
    (rundir.LOSS_PLOT, "train and eval loss curves"),
    (rundir.REPORT, "metrics before/after, loss curves, answers side by side"),
    (rundir.MANIFEST, "versions, hardware, precision, seed, data fingerprints, wall time, peak memory"),
    (rundir.TENSORBOARD + "/", "TensorBoard events (tensorboard --logdir ...)"),
    (rundir.CHECKPOINTS + "/", "complete checkpoints (--resume auto)"),
    (rundir.LOG, "the log"),
)


@dataclass
class TrainResult:
    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    train_seconds: float
    tokens_per_s: float | None
    samples: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    precision: str | None = None
    total_seconds: float | None = None
    # Per-step seconds and padded tokens; set-up, evaluation, and after the last step sample answers', test
    # split's and validation pairs' seconds: what `estimate` and the bench model.
    timing: dict = field(default_factory=dict)
    # Which step's weights the run ended with (train/evaluation.py weights_origin).
    weights: dict = field(default_factory=dict)
    # The test split's metrics with the final weights, when the run has a test split.
    test: dict | None = None
    # A preference run's held-out preference on its validation split (eval/preference.py).
    preference: dict | None = None
    task: str = "causal_lm"

    def summary(self) -> str:
        lines = [f"Run directory: {self.run_dir}"]
        for name, what in OUTPUTS:
            if (self.run_dir / name.rstrip("/")).exists():
                lines.append(f"  {name:<16} {what}")
        if self.weights:
            lines.append(f"Weights: {weights_line(self.weights)}")
        if self.eval_before is not None and self.eval_after is not None:
            lines.append(f"Eval loss: {self.eval_before:.4f} -> {self.eval_after:.4f}")
        for name in ("accuracy", "macro_f1"):
            if name in self.metrics:
                lines.append(f"Eval {name}: {self.metrics[name]:.3f}")
        if self.preference:
            lines.append(f"Validation {held_out_kind(self.preference)}: {preference_line(self.preference)}")
        if self.test:
            lines.append(f"Test ({self.test['rows']} rows): {test_line(self.test)}")
        speed = f"; {self.tokens_per_s:.0f} tok/s in its steps" if self.tokens_per_s else ""
        lines.append(f"Training time: {self.train_seconds:.0f}s with its evaluations{speed}"
                     + (f" ({self.precision})" if self.precision else ""))
        if self.total_seconds is not None:
            lines.append(f"Total time: {self.total_seconds:.0f}s (loading, training, evaluation, samples, report)")
        for sample in self.samples:
            lines.append(f"Prompt:     {one_line(sample['prompt'])}")
            lines.append(f"Base:       {one_line(sample['base'])}")
            lines.append(f"Fine-tuned: {one_line(sample['finetuned'])}")
        if self.task == "classification":
            lines.append(f"Label a text with it: loraforge predict {shlex.quote(str(self.run_dir))} --text TEXT")
        else:
            lines.append(f"Chat with it: loraforge chat {shlex.quote(str(self.run_dir))}")
        return "\n".join(lines)


# The summary shows this much of a sample answer; report.md has each whole.
SHOWN_CHARACTERS = 100


def one_line(text: str) -> str:
    """A sample prompt or answer on one line of the summary: its line breaks as ⏎, cut after SHOWN_CHARACTERS."""
    flat = " ⏎ ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return flat if len(flat) <= SHOWN_CHARACTERS else flat[:SHOWN_CHARACTERS].rstrip() + " ... (report.md has it whole)"


TEST_METRICS = (("preference_accuracy", "preference accuracy"), ("chosen_more_likely", "chosen more likely"),
                ("label_accuracy", "label accuracy"), ("loss", "loss"), ("perplexity", "perplexity"), ("token_accuracy", "token accuracy"),
                ("rouge_l", "ROUGE-L"), ("exact_match", "exact match"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"))


def test_line(test: dict) -> str:
    return ", ".join(f"{name} {test[key]:.4f}" for key, name in TEST_METRICS if key in test)


def weights_line(weights: dict) -> str:
    if weights["step"] == weights["of"] and weights["chosen_by"] == "last step":
        return f"step {weights['of']}, the last"
    value = f" ({weights['value']:.4f})" if weights.get("value") is not None else ""
    return f"step {weights['step']} of {weights['of']}, the {weights['chosen_by']}{value}"


def method_name(config: RunConfig) -> str:
    if config.adapter == "full":
        return "full fine-tune"
    name = "DoRA" if config.lora.use_dora else "LoRA"
    quant = f" {config.quantization.mode}" if config.quantization.mode != "none" else ""
    method = f" {config.method.upper()}" if config.method != "sft" else ""
    return f"{name}{quant} r={config.lora.r}{method}"


def save_model(config: RunConfig, model, tokenizer, run_dir: Path, labels: list[str] | None) -> None:
    if config.adapter == "full":
        model.save_pretrained(run_dir / rundir.MODEL)
        save_for_plain_use(tokenizer, run_dir / rundir.MODEL,
                           config.data.system_prompt if config.task == "causal_lm" else None)
    else:
        model.save_pretrained(run_dir / rundir.ADAPTER)
    rundir.open_as_umask(run_dir / (rundir.MODEL if config.adapter == "full" else rundir.ADAPTER))
    tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)
    if labels is not None:
        (run_dir / rundir.LABELS).write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")


def write_results(config: RunConfig, run_dir: Path, before: dict, after: dict, samples: list[dict], stats,
                  extra: dict) -> None:
    """eval.json, loss.png and report.md; `extra` adds run facts (parameters, timings, token counts) to eval.json."""
    (run_dir / rundir.EVAL).write_text(json.dumps({
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "metrics_before": metric_values(before),
        "metrics_after": metric_values(after),
        "data": vars(stats),
        **extra,
        "samples": samples,
    }, indent=2) + "\n", encoding="utf-8")
    plot_loss(run_dir / rundir.METRICS, run_dir / rundir.LOSS_PLOT, title=f"{config.model.name} {method_name(config)}")
    checkpoints = run_dir / rundir.CHECKPOINTS
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    weights = extra.get("weights")
    test = extra.get("test")
    preference = extra.get("preference")
    write_report(run_dir, f"{config.model.name}: {method_name(config)}", metric_values(before), metric_values(after),
                 samples, stats.summary(), weights_line(weights) if weights else None,
                 f"{test['rows']} rows: {test_line(test)}" if test else None,
                 preference_line(preference) if preference else None)


def write_run_manifest(config: RunConfig, run_dir: Path, fingerprints: dict, trainable: int, wall: float,
                       checkpoint: Path | None, steps: int, precision) -> None:
    write_manifest(run_dir / rundir.MANIFEST, config, fingerprints, trainable, wall,
                   resumed_from=str(checkpoint) if checkpoint else None, steps=steps, precision=precision.record())


def stopped_after_training(signal_name: str, config: RunConfig, run_dir: Path, step: int, resume_hint: str) -> str:
    """What a run stopped once its weights were written left, and what writes the rest: resuming from the checkpoint
    of its last step, or, with none, `loraforge eval`."""
    weights = run_dir / (rundir.MODEL if config.adapter == "full" else rundir.ADAPTER)
    checkpoint = latest_complete(run_dir / rundir.CHECKPOINTS)
    if checkpoint is not None and step_of(checkpoint) == step:
        rest = f"Write them with: {resume_hint}"
    else:
        rest = (f"No checkpoint holds step {step} to finish the run from (train.save_every); evaluate the weights "
                f"with: loraforge eval {shlex.quote(str(run_dir))}")
    return (f"stopped by {signal_name} after training (step {step}): {weights} is complete; the final evaluation, "
            f"sample answers, {rundir.EVAL}, {rundir.REPORT} and the rest of {rundir.MANIFEST} were not written. "
            f"{rest}")
