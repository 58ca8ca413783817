"""Build stage: the model made trainable, the config mapped onto TrainingArguments, and the trainer with every
callback a run needs."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, PrinterCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from loraforge import rundir
from loraforge.config import RunConfig
from loraforge.data.packing import collator
from loraforge.errors import ConfigError, DataError
from loraforge.eval.generate import asked_of
from loraforge.eval.metrics import classification_metrics
from loraforge.model.adapters import (apply_lora, load_trainable_adapter, make_fully_trainable, parameter_counts,
                                      trained_in_fp32)
from loraforge.model.load import load_for_run
from loraforge.model.lora_linear import fuse_lora_linears
from loraforge.model.rms_norm import fuse_rms_norms
from loraforge.model.rotary import fuse_rotary
from loraforge.model.swiglu import fuse_gated_mlps
from loraforge.training.batch import accumulation, world_size
from loraforge.training.callbacks import MetricsCallback, ResumedTensorBoard, SampleCallback, ThroughputCallback
from loraforge.training.prepare import Prepared
from loraforge.training.trainer import (EarlyStopping, LoraforgeTrainer, LossOnResume, NanGuard, PaddedTokensPerStep,
                                        ScheduleOnResume, SignalStop)

log = logging.getLogger("loraforge.train")


@dataclass
class Built:
    trainer: LoraforgeTrainer
    model: object
    throughput: ThroughputCallback
    padded: PaddedTokensPerStep
    trainable_parameters: int
    sampler: SampleCallback | None = None


def check_optimizer(optimizer: str) -> None:
    if optimizer != "adamw_torch" and not torch.cuda.is_available():
        raise ConfigError([f"train.optimizer: {optimizer} (bitsandbytes) needs a CUDA GPU; use adamw_torch on CPU"])


def check_sharding() -> None:
    """FSDP asked through `accelerate launch` (configs/launch/fsdp.yaml sets ACCELERATE_USE_FSDP) on a machine
    without CUDA: accelerate shards only across accelerators, and its CPU processes (MULTI_CPU) drop the FSDP
    plugin, so every process would hold the whole model while the log says FSDP. torch's fully_shard itself
    runs on CPU over gloo (tests/training/test_scale_out.py); the HF Trainer cannot drive it there."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise ConfigError(["FSDP (accelerate launch with a distributed_type: FSDP config) needs CUDA GPUs: accelerate "
                           "runs CPU processes as plain data parallel and drops the FSDP plugin, so each process "
                           "would hold the whole model. On CPU use `loraforge train CONFIG --nproc N` (DDP)"])


def trainable_model(config: RunConfig, prepared: Prepared, precision: str):
    """The config's model loaded in `precision`, its variant applied, with a LoRA adapter or fully trainable."""
    model = load_for_run(config, prepared.model_path, precision, labels=prepared.labels)
    if config.data.packing:
        # With the KV cache on, SDPA lets packed samples attend to each other; off, position ids keep them apart.
        model.config.use_cache = False
    if config.adapter == "full":
        model = make_fully_trainable(model)
    elif config.init_from is not None:
        model = trained_in_fp32(load_adapter_to_train(model, config, prepared.model_path))
    else:
        lora = config.lora
        model = trained_in_fp32(apply_lora(
            model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules, bias=lora.bias,
            use_dora=lora.use_dora, use_rslora=lora.use_rslora, modules_to_save=list(lora.modules_to_save or []) or None,
            task=config.task, quantized=config.quantization.mode != "none",
            gradient_checkpointing=config.train.gradient_checkpointing))
    if config.train.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # Checkpointed blocks need an input that requires grad, which a frozen embedding does not give.
        model.enable_input_require_grads()
    fuse_gated_mlps(model)
    fuse_lora_linears(model)
    fuse_rotary(model)
    fuse_rms_norms(model)
    return model


def load_adapter_to_train(model, config: RunConfig, model_path):
    """init_from: the adapter of a finished run on the same base model (rundir.check_init_from, before the data
    was prepared), trainable, to train on from."""
    source = Path(config.init_from)
    log.info("starting from the adapter of %s (init_from)", source)
    model = load_trainable_adapter(model, source / rundir.ADAPTER, config.lora.dropout,
                                   quantized=config.quantization.mode != "none",
                                   gradient_checkpointing=config.train.gradient_checkpointing)
    if config.method == "orpo":
        # DPO's trainer copies the starting adapter as its reference; ORPO's keeps none, so a frozen copy is loaded
        # here, for preference accuracy against the model the run started from.
        model.load_adapter(str(source / rundir.ADAPTER), adapter_name=rundir.REFERENCE, is_trainable=False)
    return model


def warmup_outlasting(train, steps: int) -> str | None:
    """Where train.warmup_steps is as long as the run or longer (a script's warmup over a small dataset): the
    learning rate rises for the whole run and never reaches train.learning_rate. None otherwise."""
    if train.warmup_steps is None or train.warmup_steps < steps or steps < 1:
        return None
    share = (steps - 1) / train.warmup_steps  # step k computes at the rate warmup gives after k - 1 steps
    return (f"train.warmup_steps {train.warmup_steps} is not shorter than the run's {steps} optimizer steps: the "
            f"learning rate rises for the whole run, to {train.learning_rate * share:.2e} at its last step, "
            f"{100 * share:.0f}% of train.learning_rate {train.learning_rate:g}; lower train.warmup_steps, or use "
            "train.warmup_ratio")


def training_arguments(config: RunConfig, run_dir: Path, precision: str, has_eval: bool) -> TrainingArguments:
    """HF's TrainingArguments from the config; TRL's DPOConfig or ORPOConfig (subclasses) for dpo and orpo."""
    train = config.train
    settings = dict(
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=train.gradient_checkpointing,
        optim=train.optimizer,
        output_dir=str(run_dir / rundir.CHECKPOINTS),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size or train.batch_size,
        gradient_accumulation_steps=accumulation(train, world_size()),
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps if train.warmup_steps is not None else train.warmup_ratio,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        max_steps=train.max_steps if train.max_steps is not None else -1,
        num_train_epochs=train.num_epochs if train.num_epochs is not None else 1.0,
        logging_steps=train.logging_steps,
        eval_strategy=("epoch" if train.eval_every == "epoch" else "steps") if has_eval else "no",
        eval_steps=train.eval_every if isinstance(train.eval_every, int) else None,
        save_strategy=("epoch" if train.save_every == "epoch" else "steps") if train.save_every else "no",
        save_steps=train.save_every if isinstance(train.save_every, int) else 500,
        metric_for_best_model=train.best_metric if has_eval else None,
        greater_is_better=None if not has_eval else "loss" not in train.best_metric,
        logging_nan_inf_filter=False,
        report_to=list(config.report_to) or "none",
        run_name=config.tracking.run_name(),
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if config.adapter == "lora" else None,
        train_sampling_strategy="group_by_length" if train.group_by_length and config.method == "sft" else "random",
    )
    if config.method == "sft":
        return TrainingArguments(**settings)
    if config.method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        # Rows arrive tokenized and cut to data.max_length; ORPO has no reference pass, so lora.dropout applies
        # as in SFT. Its batches have no input_ids for HF to count tokens by; OddsRatioTrainer counts them.
        return ORPOConfig(**{**settings, "include_num_input_tokens_seen": "no"}, beta=config.preference.beta,
                          max_length=config.data.max_length, disable_dropout=False)
    if config.method == "kto":
        from trl import KTOConfig

        # KTO pairs each row with its batch neighbour's completion for its KL term, so it samples in dataset order
        # (the examples are shuffled with the seed when unpaired), and an epoch's last, partial batch is dropped (a
        # batch of one row would pair it with itself); dropout off, as for DPO's reference pass.
        return KTOConfig(**{**settings, "train_sampling_strategy": "sequential", "dataloader_drop_last": True},
                         beta=config.preference.beta,
                         # Rows arrive cut to data.max_length; a KL row (a prompt with another row's answer) may be
                         # longer, and is cut to it as well.
                         max_length=config.data.max_length, precompute_ref_log_probs=False, disable_dropout=True)
    from trl import DPOConfig

    # Rows arrive tokenized and cut to data.max_length. Dropout off (TRL's default): the reference pass must be
    # deterministic, and an init_from adapter may carry dropout from its SFT run.
    return DPOConfig(**settings, beta=config.preference.beta, loss_type=[config.preference.loss_type],
                     max_length=None, precompute_ref_log_probs=False, disable_dropout=True)


def unpaired(rows, seed: int):
    """KTO's examples, shuffled with the seed (KTO samples in dataset order): unpaired rows as they are, pairs by
    TRL's unpairing (the chosen answer desirable, the rejected one not), which puts every desirable example first."""
    from trl import unpair_preference_dataset

    if rows is None:
        return None
    if "label" not in rows.column_names:
        rows = unpair_preference_dataset(rows.rename_columns({"chosen_ids": "chosen", "rejected_ids": "rejected"}))
        rows = rows.rename_column("completion", "completion_ids")
    return rows.shuffle(seed=seed).flatten_indices()


def _kto_examples(rows) -> int:
    """KTO's examples of a split: two per preference pair (unpaired), one per labelled row."""
    return 0 if rows is None else len(rows) if "label" in rows.column_names else 2 * len(rows)


def train_examples(config: RunConfig, prepared: Prepared) -> int:
    """The examples the trainer takes in an epoch."""
    return _kto_examples(prepared.train) if config.method == "kto" else len(prepared.train)


def check_kto_batches(config: RunConfig, prepared: Prepared) -> None:
    """KTO drops a partial batch, so a split whose examples fill no batch would train or evaluate nothing."""
    if config.method != "kto":
        return
    splits = ((prepared.train, config.train.batch_size, "training", "train.batch_size"),
              (prepared.val, config.train.eval_batch_size or config.train.batch_size, "validation", "train.eval_batch_size"))
    for rows, size, split, setting in splits:
        examples = _kto_examples(rows)
        if rows is not None and examples < size:
            raise DataError(f"{examples} KTO {split} examples fill no batch of {size} (KTO drops a partial batch, so "
                            f"nothing would be {'trained' if split == 'training' else 'evaluated'}); add rows, or "
                            f"lower {setting} (at least 2)")


def micro_batch_tokens(setting) -> int | None:
    if setting == "auto":
        return None if torch.cuda.is_available() else 256
    return setting


def classification_loss_and_metrics(prepared: Prepared):
    """A cross-entropy with the run's class weights, and accuracy, macro-F1 and confusion for evaluation."""
    weights, labels = prepared.class_weights, prepared.labels

    def loss(outputs, target, num_items_in_batch=None):
        weight = torch.tensor(weights, dtype=outputs.logits.dtype, device=outputs.logits.device) if weights else None
        total = torch.nn.functional.cross_entropy(outputs.logits.float(), target, weight=weight, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else target.numel())

    def metrics(prediction):
        predicted = prediction.predictions.argmax(-1).tolist()
        found = classification_metrics(predicted, prediction.label_ids.tolist(), labels)
        return {"accuracy": found["accuracy"], "macro_f1": found["macro_f1"],
                "confusion_matrix": json.dumps(found["confusion_matrix"]["rows_true_columns_predicted"])}

    return loss, metrics


def build_trainer(config: RunConfig, prepared: Prepared, model, run_dir: Path, precision: str, fingerprints: dict,
                  stop: SignalStop) -> Built:
    trainable, total = parameter_counts(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    causal = config.task == "causal_lm"
    loss, metrics = (None, None) if causal else classification_loss_and_metrics(prepared)
    throughput = ThroughputCallback()
    if config.method != "sft":
        from loraforge.training.preference_trainer import OddsRatioTrainer, PreferenceTrainer, UnpairedTrainer

        kto = config.method == "kto"
        trainer = {"dpo": PreferenceTrainer, "orpo": OddsRatioTrainer, "kto": UnpairedTrainer}[config.method](
            model=model,
            args=training_arguments(config, run_dir, precision, has_eval=prepared.val is not None),
            train_dataset=unpaired(prepared.train, config.seed) if kto else prepared.train,
            eval_dataset=unpaired(prepared.val, config.seed) if kto else prepared.val,
            processing_class=prepared.tokenizer,
            callbacks=[throughput, MetricsCallback(run_dir / rundir.METRICS, throughput)],
            keep_last=config.train.keep_last,
            fingerprints=fingerprints,
            group_by_length=config.train.group_by_length and not kto,
            reference_adapter=config.init_from is not None,
        )
        return _with_callbacks(trainer, config, prepared, run_dir, model, throughput, stop, trainable)
    trainer = LoraforgeTrainer(
        model=model,
        args=training_arguments(config, run_dir, precision, has_eval=prepared.val is not None),
        train_dataset=prepared.train,
        eval_dataset=prepared.val,
        data_collator=collator(prepared.tokenizer, packed=config.data.packing) if causal
        else DataCollatorWithPadding(prepared.tokenizer),
        processing_class=prepared.tokenizer,
        callbacks=[throughput, MetricsCallback(run_dir / rundir.METRICS, throughput)],
        compute_loss_func=loss,
        compute_metrics=metrics,
        keep_last=config.train.keep_last,
        fingerprints=fingerprints,
        causal_lm=causal,
        micro_batch_tokens=micro_batch_tokens(config.train.micro_batch_tokens),
    )
    return _with_callbacks(trainer, config, prepared, run_dir, model, throughput, stop, trainable)


def _with_callbacks(trainer, config: RunConfig, prepared: Prepared, run_dir: Path, model, throughput, stop: SignalStop,
                    trainable: int) -> Built:
    causal = config.task == "causal_lm"
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(TensorBoardCallback) is not None:
        trainer.add_callback(ResumedTensorBoard(stop))
    trainer.add_callback(NanGuard(trainer, config.train.nan_patience))
    trainer.add_callback(ScheduleOnResume())
    trainer.add_callback(LossOnResume(trainer))
    padded = PaddedTokensPerStep(trainer)
    trainer.add_callback(padded)
    sampler = None
    if causal and config.eval.samples_during_training and prepared.val is not None:
        prompts = (list(config.eval.sample_prompts) or prepared.val_prompts)[: config.eval.samples_during_training]
        sampler = SampleCallback(run_dir / rundir.METRICS, asked_of(prompts, config.data, prepared.tokenizer),
                                 config.eval.max_new_tokens, prepared.stop_ids)
        sampler.tensorboard = next((c for c in trainer.callback_handler.callbacks
                                    if isinstance(c, TensorBoardCallback)), None)
        trainer.add_callback(sampler)
    trainer.add_callback(stop)
    early = config.train.early_stopping
    if early.patience is not None and prepared.val is not None:
        trainer.add_callback(EarlyStopping(early.patience, early.min_delta))
    elif early.patience is not None:
        log.warning("train.early_stopping.patience %d: this run has no validation split to judge improvement on "
                    "(data.val_fraction is 0 and no source has split: val), so it trains to its last step",
                    early.patience)
    return Built(trainer, model, throughput, padded, trainable, sampler)
