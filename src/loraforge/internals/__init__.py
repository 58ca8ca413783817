"""Every use of a library's private methods, attributes or module paths, in one place.

A library upgrade can change any of these without an error, only wrong numbers, so each is named here with
the version it was checked against, and tests/test_internals.py fails loudly when one of them changes. The
rest of loraforge reaches them only through this package. TRL's preference trainers are in internals/preference.py,
imported only by runs that use them: importing TRL adds ~27 MB to every process that does.
"""

import os
from collections import defaultdict

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, Trainer, TrainerState
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import nested_gather

from loraforge.errors import ConfigError

# The label HF and TRL give tokens that carry no loss.
IGNORE = -100
CHECKED_AGAINST = {"transformers": "5.23", "bitsandbytes": "0.50", "trl": "1.16", "torch": "2.13"}


class TrainerHooks:
    """Private steps of HF's Trainer behind public hooks (transformers 5.23), for any Trainer subclass:

    - `_get_train_sampler` builds the training sampler: `train_sampler(default)` may replace it;
    - `_save_checkpoint` writes checkpoint-N under args.output_dir: `save_checkpoint(write)` wraps it, and
      `write()` runs HF's own writer;
    - `_load_from_checkpoint` loads a checkpoint's weights into the model: `load_checkpoint_weights`;
    - `train()` wraps the model for data parallelism unless `evaluate()` prepared it first:
      `evaluate_before_training`;
    - `train()` keeps the loss between logs in `_tr_loss` (since `_globalstep_last_logged`), the logged loss in
      `_total_loss_scalar`, and starts both afresh: `loss_bookkeeping` reads them for a checkpoint,
      `restore_loss_bookkeeping` puts them back on resume, and the end-of-training `train_loss` is then the run's;
      TRL's trainers keep their other metrics since the last log in `_metrics["train"]` (DPO, KTO) or
      `_stored_metrics["train"]` (ORPO) and their token count in `_total_train_tokens`, carried the same way.
    - `set_initial_training_values` counts the steps `train()` takes: `steps_of_run`.
    """

    loss_restored = False

    def train_sampler(self, default):
        return default

    def save_checkpoint(self, write) -> None:
        write()

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        self._load_from_checkpoint(checkpoint)

    def restore_without_training(self, checkpoint: str) -> None:
        """A checkpoint's weights and TrainerState, with no step taken: train(resume_from_checkpoint=...) from a
        checkpoint at max_steps in the middle of an epoch trains one step more (transformers 5.23 checks
        max_steps only after a step)."""
        self.load_checkpoint_weights(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))

    def loss_bookkeeping(self) -> dict:
        """The loss HF has summed so far: logged, and since the last log (averaged over processes, as a log does;
        every process calls this)."""
        pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
        return {"logged": self._total_loss_scalar, "pending": pending, "last_logged": self._globalstep_last_logged,
                "metrics": {k: list(v) for k, v in (self._pending_metrics() or {}).items()},
                "tokens": getattr(self, "_total_train_tokens", None)}

    def restore_loss_bookkeeping(self, saved: dict) -> None:
        """At the start of a resumed train(): the next log averages the steps since the last log before the
        checkpoint, as a straight run's does."""
        self._total_loss_scalar = saved["logged"]
        self._tr_loss += saved["pending"]
        self._globalstep_last_logged = saved["last_logged"]
        pending = self._pending_metrics()
        if pending is not None:
            pending.update({k: list(v) for k, v in saved.get("metrics", {}).items()})
        if saved.get("tokens") is not None and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = saved["tokens"]
        self.loss_restored = True

    def _pending_metrics(self):
        """TRL's training metrics since the last log, a list of values per name (DPO's and KTO's `_metrics`,
        ORPO's `_stored_metrics`); None for transformers' Trainer, which keeps none."""
        for name in ("_metrics", "_stored_metrics"):
            held = getattr(self, name, None)
            if name == "_stored_metrics" and isinstance(held, defaultdict):
                held.setdefault("train", held.default_factory())  # ORPO deletes it at every log, makes it on use
            if isinstance(held, dict) and isinstance(held.get("train"), dict):
                return held["train"]
        return None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """transformers 5.23 divides the summary's train_loss by this train() call's steps; with the run's loss
        restored it is divided by all of them."""
        if self.loss_restored and "train_loss" in logs:
            logs["train_loss"] = self._total_loss_scalar / max(self.state.global_step, 0.001)
        super().log(logs, start_time)

    def steps_of_run(self) -> int:
        """The optimizer steps train() takes in all: args.max_steps, or the epochs' share of the steps per epoch
        rounded up (transformers 5.23 counts them from the training dataloader's length)."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler(super()._get_train_sampler(train_dataset))

    def _save_checkpoint(self, model, trial):
        self.save_checkpoint(lambda: super(TrainerHooks, self)._save_checkpoint(model, trial))

    def evaluate_before_training(self) -> dict:
        """`evaluate()` before `train()`, with the model wrapped for training first under several processes.

        HF's evaluate() on a model not yet prepared prepares it for evaluation only (accelerate marks it prepared,
        unwrapped), and train() then never wraps it in DistributedDataParallel: each process would step on its own
        gradients, never averaged, with no error. train() keeps a `model_wrapped` that is already wrapped, so the
        model is wrapped here as train() would wrap it. FSDP and DeepSpeed prepare the model together with the
        optimizer, which evaluate() does not have (accelerate refuses FSDP2 a model alone; DeepSpeed below ZeRO-3
        has no inference mode): refused, before any step, with what to change."""
        if self.args.world_size > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ConfigError([f"this run evaluates before training (a preference method, init_from, trained "
                               f"lora.bias or full fine-tuning), which {'FSDP' if self.is_fsdp_enabled else 'DeepSpeed'}"
                               " cannot do before its first step; launch it with DDP (loraforge train --nproc N, or "
                               "accelerate launch without an FSDP or DeepSpeed config), or set data.val_fraction=0"])
        if self.args.world_size > 1:
            self.model_wrapped = self.accelerator.prepare_model(self.model)
        return self.evaluate()


class HookedTrainer(TrainerHooks, Trainer):
    pass


def padding_free_collator(pad_token_id: int):
    """TRL's padding-free collator (packed rows, position ids restarting per sample); trl 1.16 exports it only
    from its sft_trainer module, imported here only when rows are packed (TRL's import adds ~27 MB to a process)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def put_on_schedule(optimizer, scheduler) -> None:
    """Each parameter group's learning rate to what the LambdaLR `scheduler` gives at its current step, also as the
    rate the scheduler last reported (torch 2.13 keeps it in the private `_last_lr`, which HF logs)."""
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = rates


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the modules changed.

    On a CPU with AVX512-BF16, the first no-grad forward in eval mode (an evaluation, say) converts each
    Linear4bit weight to an inference-only layout; every later training step then gets zero gradients
    through those layers, with no error. bitsandbytes 0.50 decides that by the undocumented attribute
    `support_avx512bf16_for_cpu` of each Linear4bit; turning it off keeps evaluation and training correct.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def gguf_model(path: str, like):
    """The causal LM a GGUF file holds, in float32, the file parsed once: `from_pretrained(gguf_file=...)` parses a
    file of an architecture its legacy GGUF reader covers (llama, qwen2, mistral, gemma, phi3, ...) once for the
    config and again for the weights (transformers 5.23), each ~2.7 s with a 49k-token vocabulary. `like`: a model
    of the file's architecture, whose parameter names map the file's tensor names."""
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=like, torch_dtype=torch.float32)
    config = AutoConfig.for_model(**parsed["config"])
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=parsed["tensors"],
                                                                     dtype=torch.float32)
