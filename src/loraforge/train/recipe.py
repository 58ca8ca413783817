"""run_training: config → data + model + LoRA → HF Trainer → adapter, metrics, before/after eval, summary."""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import rundir
from loraforge.config import RunConfig, write_resolved
from loraforge.errors import ConfigError, LoraforgeError

log = logging.getLogger("loraforge.train")


_OUTPUTS = (
    (rundir.ADAPTER + "/", "LoRA adapter (peft.PeftModel.from_pretrained loads it)"),
    (rundir.MODEL + "/", "the fully fine-tuned model (transformers loads it)"),
    (rundir.LABELS, "label names in id order"),
    (rundir.TOKENIZER + "/", "tokenizer with its chat template"),
    (rundir.RESOLVED, "the full config this run used"),
    (rundir.METRICS, "loss, learning rate and tokens/s per logged step"),
    (rundir.EVAL, "eval loss before and after, sample answers"),
    (rundir.LOSS_PLOT, "train and eval loss curves"),
    (rundir.REPORT, "metrics before/after, loss curves, answers side by side"),
    (rundir.MANIFEST, "versions, hardware, seed, data fingerprints, wall time, peak memory"),
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
    step_seconds: list[float] = field(default_factory=list)
    step_padded_tokens: list[int] = field(default_factory=list)
    eval_seconds: float | None = None
    setup_seconds: float | None = None
    total_seconds: float | None = None
    precision: str | None = None

    def summary(self) -> str:
        lines = [f"Run directory: {self.run_dir}"]
        for name, what in _OUTPUTS:
            if (self.run_dir / name.rstrip("/")).exists():
                lines.append(f"  {name:<16} {what}")
        if self.eval_before is not None and self.eval_after is not None:
            lines.append(f"Eval loss: {self.eval_before:.4f} -> {self.eval_after:.4f}")
        for name in ("accuracy", "macro_f1"):
            if name in self.metrics:
                lines.append(f"Eval {name}: {self.metrics[name]:.3f}")
        speed = f", {self.tokens_per_s:.0f} tok/s" if self.tokens_per_s else ""
        lines.append(f"Training time: {self.train_seconds:.0f}s{speed}" + (
            f" ({self.precision})" if self.precision else ""))
        if self.total_seconds is not None:
            lines.append(f"Total time: {self.total_seconds:.0f}s (loading, training, evaluation, samples, report)")
        for sample in self.samples:
            lines.append(f"Prompt:     {sample['prompt']}")
            lines.append(f"Base:       {sample['base']}")
            lines.append(f"Fine-tuned: {sample['finetuned']}")
        lines.append(f"Chat with it: loraforge chat {self.run_dir}")
        return "\n".join(lines)


class TrainingStopped(LoraforgeError):
    """Training ended early: interrupted by a signal, or stopped by a non-finite loss."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_training(config: RunConfig, resume: str | None = None, allow_changes: bool = False,
                 config_path: str | None = None) -> TrainResult:
    """Train from a config; with resume ("auto" or a checkpoint folder), carry on a run from its checkpoint."""
    called_at = time.perf_counter()
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    from loraforge.data.cache import cache_key
    from loraforge.data.render import stop_token_ids
    from loraforge.eval.plots import plot_loss
    from loraforge.eval.report import write_report
    from loraforge.model.adapters import parameter_counts
    from loraforge.model.load import load_for_run, load_model_config, load_tokenizer
    from loraforge.model.precision import choose_precision
    from loraforge.model.sources import resolve_model
    from loraforge.train.callbacks import MetricsCallback, ThroughputCallback
    from loraforge.train.checkpoints import latest_complete
    from loraforge.train.manifest import write_manifest
    from loraforge.train.resume import check_compatible, config_fingerprint, find_checkpoint, rewind_metrics
    from loraforge.train.trainer import LoraforgeTrainer, NanGuard, PaddedTokensPerStep, SignalStop

    is_main = _is_main_process()
    checkpoint = find_checkpoint(Path(config.output_dir), resume) if resume else None
    if checkpoint is None and is_main:
        rundir.ensure_free(config.output_dir)
    _check_optimizer(config.train.optimizer)
    set_seed(config.seed)
    model_path = resolve_model(config.model.name)
    log.info("model %s (%s)", config.model.name, model_path)
    precision = choose_precision(config.precision, load_model_config(model_path, config.model.revision,
                                                                      config.model.trust_remote_code))
    tokenizer = load_tokenizer(model_path, config.data.chat_template, config.model.revision, config.model.trust_remote_code)
    if config.task == "classification":
        data = _classification_data(config, tokenizer)
        model = load_for_run(config, model_path, precision.chosen, labels=data.labels)
        stop_ids = frozenset()
    else:
        model = load_for_run(config, model_path, precision.chosen)
        stop_ids = stop_token_ids(tokenizer, model.generation_config)
        data = _causal_data(config, tokenizer, stop_ids)
    log.info("data: %s", data.stats.summary())
    fingerprints = {"config": config_fingerprint(config), "data": cache_key(config.data, config.seed, tokenizer, stop_ids)}
    if checkpoint is not None:
        check_compatible(config, checkpoint, fingerprints, allow_changes)

    run_dir = rundir.create(config.output_dir) if checkpoint is None and is_main else Path(config.output_dir)
    handler = _log_to_file(run_dir / rundir.LOG, config.logging.level) if is_main else None
    stop = SignalStop()
    try:
        if is_main:
            write_resolved(config, run_dir)
        log.info("model %s (%s); data: %s", config.model.name, model_path, data.stats.summary())
        if config.data.packing:
            # With the KV cache on, SDPA lets packed samples attend to each other; off, position ids keep them apart.
            model.config.use_cache = False
        model = _trainable(config, model)
        trainable, total = parameter_counts(model)
        log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

        throughput = ThroughputCallback()
        # TensorBoardCallback reads its folder from the environment when the trainer is built.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / rundir.TENSORBOARD)
        trainer = LoraforgeTrainer(
            model=model,
            args=_training_arguments(config, run_dir, precision.chosen, has_eval=data.val is not None),
            train_dataset=data.train,
            eval_dataset=data.val,
            data_collator=data.collator,
            processing_class=tokenizer,
            callbacks=[throughput, MetricsCallback(run_dir / rundir.METRICS, throughput)],
            compute_loss_func=data.loss,
            compute_metrics=data.metrics,
            keep_last=config.train.keep_last,
            fingerprints=fingerprints,
            causal_lm=config.task == "causal_lm",
            micro_batch_tokens=_micro_batch_tokens(config.train.micro_batch_tokens),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(NanGuard(trainer, config.train.nan_patience))
        trainer.add_callback(PaddedTokensPerStep(trainer))
        if config.task == "causal_lm" and config.eval.samples_during_training and data.val is not None:
            from loraforge.eval.generate import prompt_messages
            from loraforge.train.callbacks import SampleCallback

            prompts = (list(config.eval.sample_prompts) or data.val_prompts)[: config.eval.samples_during_training]
            sampler = SampleCallback(run_dir / rundir.METRICS, [prompt_messages(p, config.data.system_prompt) for p in prompts],
                                     config.eval.max_new_tokens, stop_ids)
            sampler.tensorboard = next((c for c in trainer.callback_handler.callbacks
                                        if type(c).__name__ == "TensorBoardCallback"), None)
            trainer.add_callback(sampler)
        trainer.add_callback(stop)
        early = config.train.early_stopping
        if early.patience is not None and data.val is not None:
            trainer.add_callback(EarlyStoppingCallback(early.patience, early.min_delta))

        # A LoRA adapter starts as the identity, so the base model's evaluation, run after training with the
        # adapter switched off, is the step-0 evaluation; training then starts without waiting for it.
        base_at_end = config.adapter == "lora" and data.val is not None
        before = {}
        if checkpoint is not None:
            log.info("resuming from %s", checkpoint)
            first = rewind_metrics(run_dir / rundir.METRICS, checkpoint) if is_main else None
            before = {"eval_loss": first["eval_loss"]} if first and not base_at_end else {}
        elif data.val is not None and not base_at_end:
            before = trainer.evaluate()
        setup_seconds = time.perf_counter() - called_at
        if before:
            log.info("eval loss before training: %.4f", before["eval_loss"])
        stop.install()
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        wall = time.perf_counter() - started
        stop.uninstall()
        resume_hint = f"loraforge train {config_path or 'CONFIG'} output_dir={run_dir} --resume auto"
        if trainer.poisoned_step is not None:
            last_good = latest_complete(run_dir / rundir.CHECKPOINTS)
            raise TrainingStopped(
                f"the training loss became NaN or inf at step {trainer.poisoned_step} (train.nan_patience="
                f"{config.train.nan_patience}); stopped without saving that state. Last good checkpoint: "
                f"{last_good or 'none'}. Lower train.learning_rate or check the data, then resume or restart",
                exit_code=3,
            )
        if stop.received:
            raise TrainingStopped(
                f"stopped by {stop.received} after step {trainer.state.global_step}; checkpoint "
                f"{latest_complete(run_dir / rundir.CHECKPOINTS)} written. Resume with: {resume_hint}",
                exit_code=130 if stop.received == "SIGINT" else 143,
            )
        if config.train.load_best_at_end and trainer.state.best_model_checkpoint:
            log.info("loading the best checkpoint %s (%s %.4f)", trainer.state.best_model_checkpoint,
                     config.train.best_metric, trainer.state.best_metric)
            trainer._load_from_checkpoint(trainer.state.best_model_checkpoint)
            after = trainer.evaluate()
        else:
            after = _final_eval(trainer) if data.val is not None else {}
        eval_seconds = before.get("eval_runtime")
        if base_at_end:
            before, eval_seconds = _base_eval(trainer, model)
            if is_main:
                _record_step_zero(run_dir / rundir.METRICS, run_dir / rundir.TENSORBOARD
                                  if "tensorboard" in config.report_to else None, before)
            log.info("eval loss of the base model (step 0): %.4f", before["eval_loss"])
        if not is_main:
            return TrainResult(run_dir, before.get("eval_loss"), after.get("eval_loss"), wall, None)

        if config.adapter == "full":
            model.save_pretrained(run_dir / rundir.MODEL)
            tokenizer.save_pretrained(run_dir / rundir.MODEL)
        else:
            model.save_pretrained(run_dir / rundir.ADAPTER)
        tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)
        if config.task == "classification":
            (run_dir / rundir.LABELS).write_text(json.dumps(data.labels, indent=2) + "\n", encoding="utf-8")
        plot_loss(run_dir / rundir.METRICS, run_dir / rundir.LOSS_PLOT, title=f"{config.model.name} {_method(config)}")
        _remove_if_empty(run_dir / rundir.CHECKPOINTS)

        samples = [] if config.task == "classification" else _sample_answers(config, model, tokenizer, stop_ids,
                                                                             data.val_prompts, precision.chosen)
        (run_dir / rundir.EVAL).write_text(
            json.dumps(
                {
                    "eval_loss_before": before.get("eval_loss"),
                    "eval_loss_after": after.get("eval_loss"),
                    "metrics_before": _metric_values(before),
                    "metrics_after": _metric_values(after),
                    "data": vars(data.stats),
                    "trainable_parameters": trainable,
                    "train_seconds": round(throughput.train_seconds, 2),
                    "wall_seconds": round(wall, 2),
                    "first_step_seconds": round(throughput.first_step_done_at - called_at, 2)
                    if throughput.first_step_done_at else None,
                    "real_tokens": trainer.state.num_input_tokens_seen,
                    "padded_tokens": trainer.padded_tokens,
                    "samples": samples,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        write_report(run_dir, f"{config.model.name}: {_method(config)}", _metric_values(before),
                     _metric_values(after), samples, data.stats.summary())
        write_manifest(run_dir / rundir.MANIFEST, config, fingerprints, trainable, wall,
                       resumed_from=str(checkpoint) if checkpoint else None, steps=trainer.state.global_step,
                       precision=precision.record())
        tokens_seen = trainer.state.num_input_tokens_seen
        speed = tokens_seen / throughput.train_seconds if throughput.train_seconds else None
        return TrainResult(run_dir, before.get("eval_loss"), after.get("eval_loss"), wall, speed, samples,
                           metrics=_metric_values(after), step_seconds=throughput.step_seconds,
                           step_padded_tokens=trainer.step_padded_tokens, eval_seconds=eval_seconds,
                           setup_seconds=setup_seconds, total_seconds=time.perf_counter() - called_at,
                           precision=precision.chosen)
    finally:
        stop.uninstall()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class _Data:
    train: object
    val: object | None
    stats: object
    collator: object
    val_prompts: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    loss: object = None
    metrics: object = None


def _causal_data(config: RunConfig, tokenizer, stop_ids) -> _Data:
    from loraforge.data.build import build_datasets
    from loraforge.data.packing import collator
    from loraforge.model.sources import loraforge_home

    bundle = build_datasets(config.data, tokenizer, stop_ids, config.seed, cache_dir=loraforge_home() / "data-cache")
    return _Data(bundle.train, bundle.val, bundle.stats, collator(tokenizer, packed=config.data.packing),
                 val_prompts=bundle.val_prompts)


def _classification_data(config: RunConfig, tokenizer) -> _Data:
    from transformers import DataCollatorWithPadding

    from loraforge.data.classify import build_classification
    from loraforge.eval.metrics import classification_metrics

    train, val, labels, weights, stats = build_classification(config.data, config.classification, tokenizer, config.seed)
    log.info("labels: %s%s", labels, f"; class weights {[round(w, 3) for w in weights]}" if weights else "")

    def loss(outputs, target, num_items_in_batch=None):
        import torch

        weight = torch.tensor(weights, dtype=outputs.logits.dtype, device=outputs.logits.device) if weights else None
        total = torch.nn.functional.cross_entropy(outputs.logits.float(), target, weight=weight, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else target.numel())

    def metrics(prediction):
        predicted = prediction.predictions.argmax(-1).tolist()
        found = classification_metrics(predicted, prediction.label_ids.tolist(), labels)
        return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"],
                "confusion_matrix": json.dumps(found["confusion_matrix"]["rows_true_columns_predicted"])}

    return _Data(train, val, stats, DataCollatorWithPadding(tokenizer), labels=labels, loss=loss, metrics=metrics)


def _trainable(config: RunConfig, model):
    from loraforge.model.adapters import apply_lora, make_fully_trainable

    if config.adapter == "full":
        model = make_fully_trainable(model)
    else:
        lora = config.lora
        model = apply_lora(
            model,
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=lora.target_modules,
            bias=lora.bias,
            use_dora=lora.use_dora,
            use_rslora=lora.use_rslora,
            modules_to_save=lora.modules_to_save,
            task=config.task,
            quantized=config.quantization.mode != "none",
            gradient_checkpointing=config.train.gradient_checkpointing,
        )
    if config.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # Checkpointed blocks need an input that requires grad, which a frozen embedding does not give.
        model.enable_input_require_grads()
    return model


def _micro_batch_tokens(setting) -> int | None:
    import torch

    if setting == "auto":
        return None if torch.cuda.is_available() else 256
    return setting


def _method(config: RunConfig) -> str:
    if config.adapter == "full":
        return "full fine-tune"
    name = "DoRA" if config.lora.use_dora else "LoRA"
    quant = f" {config.quantization.mode}" if config.quantization.mode != "none" else ""
    return f"{name}{quant} r={config.lora.r}"


def _metric_values(metrics: dict) -> dict:
    import math

    values = {k.removeprefix("eval_"): v for k, v in metrics.items()
              if k.startswith("eval_") and not k.endswith(("runtime", "per_second", "preparation_time"))}
    if "loss" in values and values["loss"] is not None:
        values["perplexity"] = math.exp(min(values["loss"], 50.0))
    return values


def _check_optimizer(optimizer: str) -> None:
    import torch

    if optimizer != "adamw_torch" and not torch.cuda.is_available():
        raise ConfigError([f"train.optimizer: {optimizer} (bitsandbytes) needs a CUDA GPU; use adamw_torch on CPU"])


def _training_arguments(config: RunConfig, run_dir: Path, precision: str, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    train = config.train
    return TrainingArguments(
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        optim=train.optimizer,
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        max_steps=train.max_steps if train.max_steps is not None else -1,
        num_train_epochs=train.num_epochs if train.num_epochs is not None else 1.0,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train.eval_every,
        save_strategy="steps" if train.save_every else "no",
        save_steps=train.save_every or 500,
        metric_for_best_model=train.best_metric if has_eval else None,
        greater_is_better=None if not has_eval else "loss" not in train.best_metric,
        logging_nan_inf_filter=False,
        report_to=list(config.report_to) or "none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
    )


def _base_eval(trainer, model) -> tuple[dict, float]:
    """Metrics of the base model on the validation split (adapter off), without logging them as a new step."""
    started = time.perf_counter()
    with model.disable_adapter():
        output = trainer.evaluation_loop(trainer.get_eval_dataloader(), description="base model",
                                         prediction_loss_only=True if trainer.compute_metrics is None else None)
    return output.metrics, time.perf_counter() - started


def _record_step_zero(metrics_path: Path, tensorboard_dir: Path | None, metrics: dict) -> None:
    """The base evaluation as the step-0 record of metrics.jsonl and TensorBoard, unless one is there."""
    if metrics_path.is_file() and any(
        r.get("step") == 0 and "eval_loss" in r for r in map(json.loads, metrics_path.read_text(encoding="utf-8").splitlines())
    ):
        return
    record = {"step": 0, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "tokens_seen": 0}
    with metrics_path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(tensorboard_dir)) as writer:
            for key, value in record.items():
                if key.startswith("eval_"):
                    writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, 0)


def _final_eval(trainer) -> dict:
    for record in reversed(trainer.state.log_history):
        if "eval_loss" in record and record.get("step") == trainer.state.global_step:
            return record
    return trainer.evaluate()


def _sample_answers(config: RunConfig, model, tokenizer, stop_ids, val_prompts: list[str], precision: str) -> list[dict]:
    from loraforge.eval.generate import generate_batch, prompt_messages

    prompts = list(config.eval.sample_prompts) or val_prompts[: config.eval.num_samples]
    chats = [prompt_messages(p, config.data.system_prompt) for p in prompts]
    limit = config.eval.max_new_tokens
    if config.adapter == "full":
        from loraforge.model.load import load_for_run
        from loraforge.model.sources import resolve_model

        base = generate_batch(load_for_run(config, resolve_model(config.model.name), precision), tokenizer, chats, limit,
                              stop_ids)
    else:
        with model.disable_adapter():
            base = generate_batch(model, tokenizer, chats, limit, stop_ids)
    tuned = generate_batch(model, tokenizer, chats, limit, stop_ids)
    return [{"prompt": p, "base": b, "finetuned": t} for p, b, t in zip(prompts, base, tuned)]


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _log_to_file(path: Path, level: str = "INFO") -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("loraforge").setLevel(level)
    return handler
