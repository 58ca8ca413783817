"""run_training: config → data + model + LoRA → HF Trainer → adapter, metrics, before/after eval, summary."""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import rundir
from loraforge.config import RunConfig, write_resolved

log = logging.getLogger("loraforge.train")


@dataclass
class TrainResult:
    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    train_seconds: float
    tokens_per_s: float | None
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"Run directory: {self.run_dir}"]
        for name, what in (
            (rundir.ADAPTER + "/", "LoRA adapter (peft.PeftModel.from_pretrained loads it)"),
            (rundir.TOKENIZER + "/", "tokenizer with its chat template"),
            (rundir.RESOLVED, "the full config this run used"),
            (rundir.METRICS, "loss, learning rate and tokens/s per logged step"),
            (rundir.EVAL, "eval loss before and after, sample answers"),
            (rundir.LOSS_PLOT, "train and eval loss curves"),
            (rundir.LOG, "the log"),
        ):
            lines.append(f"  {name:<16} {what}")
        if self.eval_before is not None and self.eval_after is not None:
            lines.append(f"Eval loss: {self.eval_before:.4f} -> {self.eval_after:.4f}")
        speed = f", {self.tokens_per_s:.0f} tok/s" if self.tokens_per_s else ""
        lines.append(f"Training time: {self.train_seconds:.0f}s{speed}")
        for sample in self.samples:
            lines.append(f"Prompt:     {sample['prompt']}")
            lines.append(f"Base:       {sample['base']}")
            lines.append(f"Fine-tuned: {sample['finetuned']}")
        lines.append(f"Chat with it: loraforge chat {self.run_dir}")
        return "\n".join(lines)


def run_training(config: RunConfig) -> TrainResult:
    from transformers import PrinterCallback, Trainer, set_seed

    from loraforge.data.build import build_datasets
    from loraforge.data.packing import collator
    from loraforge.data.render import stop_token_ids
    from loraforge.eval.plots import plot_loss
    from loraforge.model.adapters import apply_lora, parameter_counts
    from loraforge.model.load import load_model, load_tokenizer
    from loraforge.model.sources import loraforge_home, resolve_model
    from loraforge.train.callbacks import MetricsCallback, ThroughputCallback

    rundir.ensure_free(config.output_dir)
    set_seed(config.seed)
    model_path = resolve_model(config.model.name)
    log.info("model %s (%s)", config.model.name, model_path)
    tokenizer = load_tokenizer(model_path, config.data.chat_template)
    model = load_model(model_path)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    data = build_datasets(config.data, tokenizer, stop_ids, config.seed, cache_dir=loraforge_home() / "data-cache")
    log.info("data: %s", data.stats.summary())

    run_dir = rundir.create(config.output_dir)
    handler = _log_to_file(run_dir / rundir.LOG)
    try:
        write_resolved(config, run_dir)
        log.info("model %s (%s); data: %s", config.model.name, model_path, data.stats.summary())
        if config.data.packing:
            # With the KV cache on, SDPA lets packed samples attend to each other; off, position ids keep them apart.
            model.config.use_cache = False
        model = apply_lora(
            model,
            r=config.lora.r,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            bias=config.lora.bias,
        )
        trainable, total = parameter_counts(model)
        log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)

        throughput = ThroughputCallback()
        trainer = Trainer(
            model=model,
            args=_training_arguments(config, run_dir, has_eval=data.val is not None),
            train_dataset=data.train,
            eval_dataset=data.val,
            data_collator=collator(tokenizer, packed=config.data.packing),
            processing_class=tokenizer,
            callbacks=[throughput, MetricsCallback(run_dir / rundir.METRICS, throughput)],
        )
        trainer.remove_callback(PrinterCallback)

        before = trainer.evaluate(metric_key_prefix="eval")["eval_loss"] if data.val is not None else None
        if before is not None:
            log.info("eval loss before training: %.4f", before)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        after = _final_eval_loss(trainer) if data.val is not None else None

        model.save_pretrained(run_dir / rundir.ADAPTER)
        tokenizer.save_pretrained(run_dir / rundir.TOKENIZER)
        plot_loss(run_dir / rundir.METRICS, run_dir / rundir.LOSS_PLOT, title=f"{config.model.name} LoRA r={config.lora.r}")
        _remove_if_empty(run_dir / rundir.CHECKPOINTS)

        samples = _sample_answers(config, model, tokenizer, stop_ids, data.val_prompts)
        (run_dir / rundir.EVAL).write_text(
            json.dumps(
                {
                    "eval_loss_before": before,
                    "eval_loss_after": after,
                    "data": vars(data.stats),
                    "trainable_parameters": trainable,
                    "train_seconds": round(throughput.train_seconds, 2),
                    "wall_seconds": round(wall, 2),
                    "samples": samples,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        tokens_seen = trainer.state.num_input_tokens_seen
        speed = tokens_seen / throughput.train_seconds if throughput.train_seconds else None
        return TrainResult(run_dir, before, after, wall, speed, samples)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _training_arguments(config: RunConfig, run_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    train = config.train
    return TrainingArguments(
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
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
    )


def _final_eval_loss(trainer) -> float:
    for record in reversed(trainer.state.log_history):
        if "eval_loss" in record and record.get("step") == trainer.state.global_step:
            return record["eval_loss"]
    return trainer.evaluate(metric_key_prefix="eval")["eval_loss"]


def _sample_answers(config: RunConfig, model, tokenizer, stop_ids, val_prompts: list[str]) -> list[dict]:
    from loraforge.eval.generate import generate, prompt_messages

    prompts = list(config.eval.sample_prompts) or val_prompts[:1]
    samples = []
    for prompt in prompts:
        messages = prompt_messages(prompt, config.data.system_prompt)
        with model.disable_adapter():
            base = generate(model, tokenizer, messages, config.eval.max_new_tokens, stop_ids)
        tuned = generate(model, tokenizer, messages, config.eval.max_new_tokens, stop_ids)
        samples.append({"prompt": prompt, "base": base, "finetuned": tuned})
    return samples


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger("loraforge").getEffectiveLevel() > logging.INFO:
        logging.getLogger("loraforge").setLevel(logging.INFO)
    return handler
