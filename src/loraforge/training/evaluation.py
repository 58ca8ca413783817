"""The before/after evaluation of a run and its sample answers, base against fine-tuned.

A plain LoRA adapter starts as the identity and can be switched off, so the base model's evaluation is run
after training with the adapter off, as the step-0 evaluation, and training starts at once. Where switching
the adapter off does not give the base back (full fine-tuning; lora.bias all or lora_only, whose biases are
trained in place), the base is evaluated and answers before training instead.
"""

import json
import logging
import math
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from loraforge import rundir
from loraforge.config import RunConfig
from loraforge.eval.generate import asked_of, generate_batch, prompt_text
from loraforge.eval.preference import held_out_kind, preference_line, preference_metrics
from loraforge.eval.run import (causal_rows_metrics, classification_rows_metrics, eval_rows, has_test_split,
                                preference_rows_metrics)
from loraforge.training.resume import rewind_metrics, trains_on

log = logging.getLogger("loraforge.train")


def adapter_off_is_base(config: RunConfig) -> bool:
    """Switching the adapter off gives the starting model back (not so from init_from's adapter), and the base's
    metrics are those of the run (a preference run's are measured against a reference, before training)."""
    return config.adapter == "lora" and config.lora.bias == "none" and config.init_from is None and config.method == "sft"


def evaluate_before(trainer, config: RunConfig, has_val: bool, checkpoint: Path | None, run_dir: Path,
                    is_main: bool) -> dict:
    """The step-0 metrics known before training: none where they come after it (adapter off), the recorded
    ones on resume (metrics.jsonl loses what was logged after the checkpoint), else an evaluation now."""
    first = None
    if checkpoint is not None and is_main:
        trains = trains_on(checkpoint, trainer.steps_of_run(), config.train.early_stopping.patience)
        first = rewind_metrics(run_dir / rundir.METRICS, checkpoint, trains)
    if not has_val or adapter_off_is_base(config):
        return {}
    if checkpoint is not None:
        return {k: v for k, v in first.items() if k.startswith("eval_")} if first else {}
    before = trainer.evaluate_before_training()
    log.info("eval loss before training: %.4f", before["eval_loss"])
    return before


def weights_origin(trainer, config: RunConfig, has_val: bool) -> dict:
    """Which step's weights the run ends with: the best checkpoint by best_metric (load_best_at_end), else the last."""
    state, last = trainer.state, trainer.state.global_step
    if has_val and config.train.load_best_at_end and not state.best_global_step and state.best_metric is not None:
        # HF tracks the best value but not its step when nothing is saved (train.save_every: null).
        key = f"eval_{config.train.best_metric.removeprefix('eval_')}"
        best = max((r["step"] for r in state.log_history if r.get(key) == state.best_metric), default=last)
        if best != last:
            log.warning("the best evaluation (step %d, %s %.4f) fell on no checkpoint (train.save_every is null), so "
                        "the run ends with the last step's weights; set train.save_every to a multiple of "
                        "train.eval_every to keep the best", best, config.train.best_metric, state.best_metric)
    if not (has_val and config.train.load_best_at_end and state.best_global_step) or state.best_global_step == last:
        return {"step": last, "of": last, "chosen_by": "last step"}
    if trainer.args.world_size > 1:
        # Only rank 0 knows where the best checkpoint was published, and the others would evaluate other weights.
        log.warning("several processes: the run ends with the last step's weights; the best checkpoint (step %d) "
                    "is kept under checkpoints/", state.best_global_step)
        return {"step": last, "of": last, "chosen_by": "last step"}
    best = Path(state.best_model_checkpoint or "")
    if best.name != f"checkpoint-{state.best_global_step}" or not best.is_dir():
        log.warning("the best evaluation (step %d, %s %.4f) fell on no checkpoint, so the run ends with the last "
                    "step's weights; make train.save_every a multiple of train.eval_every to keep the best",
                    state.best_global_step, config.train.best_metric, state.best_metric)
        return {"step": last, "of": last, "chosen_by": "last step"}
    return {"step": state.best_global_step, "of": last, "chosen_by": f"best {config.train.best_metric}",
            "value": state.best_metric, "checkpoint": str(best)}


def use_weights(trainer, config: RunConfig, origin: dict) -> None:
    """The model with the weights the run ends with: the best checkpoint's where they are not the last step's."""
    if origin["step"] != origin["of"]:
        log.info("ending with the best checkpoint, step %d of %d (%s %.4f)", origin["step"], origin["of"],
                 config.train.best_metric, origin["value"])
        trainer.load_checkpoint_weights(origin["checkpoint"])


def evaluate_after(trainer, config: RunConfig, has_val: bool, origin: dict) -> dict:
    """The metrics of the weights the run ends with (use_weights gave them to the model)."""
    if origin["step"] != origin["of"]:
        # Not trainer.evaluate(): that would log the best step's loss as the last step's in the curves.
        found = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="best checkpoint",
                                        prediction_loss_only=True if trainer.compute_metrics is None else None).metrics
        if hasattr(trainer, "drain_eval_metrics"):
            found.update(trainer.drain_eval_metrics())
        return found
    if not has_val:
        return {}
    for record in reversed(trainer.state.log_history):
        if "eval_loss" in record and record.get("step") == trainer.state.global_step:
            return record
    return trainer.evaluate()


def evaluate_test(config: RunConfig, model, tokenizer, stop_ids, labels: list[str] | None) -> dict | None:
    """Metrics of the test split with the run's final weights; None when the run has no test split."""
    if not has_test_split(config):
        return None
    data_config, rows = eval_rows(config, None, "test")
    if config.method != "sft":
        found = preference_rows_metrics(model, tokenizer, stop_ids, data_config, rows, config.preference.beta,
                                         config.train.eval_batch_size or config.train.batch_size)
        log.info("test split: %s", preference_line(found))
        found["rows"] = found.get("pairs", found.get("rows"))
        return found
    if config.task == "classification":
        found = classification_rows_metrics(model, tokenizer, labels, rows, config.data.max_length)
        found["rows"] = len(rows)
        log.info("test split (%d rows): accuracy %.4f, macro-F1 %.4f", len(rows), found["accuracy"], found["macro_f1"])
    else:
        found = causal_rows_metrics(model, tokenizer, stop_ids, data_config, rows, config.eval.max_new_tokens,
                                    config.eval.test_generations)
        log.info("test split (%d rows): loss %.4f, perplexity %.2f, token accuracy %.4f", found["rows"], found["loss"],
                 found["perplexity"], found["token_accuracy"])
    return found


def evaluate_pairs(config: RunConfig, model, prepared) -> dict | None:
    """A preference run's held-out preference on its validation split with the final weights (eval/preference.py)."""
    if config.method == "sft" or prepared.val is None:
        return None
    found = preference_metrics(model, prepared.val, prepared.tokenizer.pad_token_id, config.preference.beta,
                               config.train.eval_batch_size or config.train.batch_size)
    log.info("validation %s: %s", held_out_kind(found), preference_line(found))
    return found


def evaluate_base_after(trainer, model, config: RunConfig, run_dir: Path, is_main: bool) -> tuple[dict, float]:
    """The base model's metrics on the validation split, adapter off, recorded as step 0 (metrics.jsonl and
    TensorBoard) without logging a new step."""
    started = time.perf_counter()
    with model.disable_adapter():
        output = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="base model",
                                         prediction_loss_only=True if trainer.compute_metrics is None else None)
    seconds = time.perf_counter() - started
    if is_main:
        record_step_zero(run_dir / rundir.METRICS,
                         run_dir / rundir.TENSORBOARD if "tensorboard" in config.report_to else None, output.metrics)
    log.info("eval loss of the base model (step 0): %.4f", output.metrics["eval_loss"])
    return output.metrics, seconds


def record_step_zero(metrics_path: Path, tensorboard_dir: Path | None, metrics: dict) -> None:
    """The base evaluation as the step-0 record of metrics.jsonl and TensorBoard, unless one is there."""
    if metrics_path.is_file() and any(
        r.get("step") == 0 and "eval_loss" in r for r in rundir.read_metrics(metrics_path)
    ):
        return
    record = {"step": 0, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "tokens_seen": 0}
    with metrics_path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if tensorboard_dir is not None:
        with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
            for key, value in record.items():
                if key.startswith("eval_"):
                    writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, 0)


def metric_values(metrics: dict) -> dict:
    """eval_* metrics without the prefix and the timing entries, with perplexity from a language-model loss."""
    values = {k.removeprefix("eval_"): v for k, v in metrics.items()
              if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "preparation_time"))}
    preference = any(k.startswith("rewards/") for k in values)
    if "loss" in values and values["loss"] is not None and not preference:
        values["perplexity"] = math.exp(min(values["loss"], 50.0))
    return values


def sample_chats(config: RunConfig, val_prompts: list[str], tokenizer) -> list[str | list[dict]]:
    """What the run answers at its end (eval.sample_prompts, or the first validation prompts)."""
    if config.task != "causal_lm":
        return []
    return asked_of(list(config.eval.sample_prompts) or val_prompts[: config.eval.num_samples], config.data, tokenizer)


def base_answers_before(config: RunConfig, model, tokenizer, stop_ids, chats: list[list[dict]]) -> list[str] | None:
    """The base model's answers, when they cannot be had after training by switching the adapter off."""
    if not chats or adapter_off_is_base(config):
        return None
    answers = generate_batch(model, tokenizer, chats, config.eval.max_new_tokens, stop_ids)
    model.train()
    return answers


def sample_answers(config: RunConfig, model, tokenizer, stop_ids, chats: list[list[dict]],
                   base: list[str] | None) -> list[dict]:
    limit = config.eval.max_new_tokens
    if base is None and chats:
        with model.disable_adapter():
            base = generate_batch(model, tokenizer, chats, limit, stop_ids)
    tuned = generate_batch(model, tokenizer, chats, limit, stop_ids) if chats else []
    return [{"prompt": prompt_text(c), "base": b, "finetuned": t} for c, b, t in zip(chats, base or [], tuned)]
