"""Every use of a library's private methods, attributes or module paths, in one place.

A library upgrade can change any of these without an error, only wrong numbers, so each is named here with
the version it was checked against, and tests/test_internals.py fails loudly when one of them changes. The
rest of loraforge reaches them only through this module.
"""

import bitsandbytes as bnb
from transformers import Trainer
from trl import DPOTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

CHECKED_AGAINST = {"transformers": "5.23", "bitsandbytes": "0.50", "trl": "1.16"}


class TrainerHooks:
    """Three private steps of HF's Trainer behind public hooks (transformers 5.23), for any Trainer subclass:

    - `_get_train_sampler` builds the training sampler: `train_sampler(default)` may replace it;
    - `_save_checkpoint` writes checkpoint-N under args.output_dir: `save_checkpoint(write)` wraps it, and
      `write()` runs HF's own writer;
    - `_load_from_checkpoint` loads a checkpoint's weights into the model: `load_checkpoint_weights`.
    """

    def train_sampler(self, default):
        return default

    def save_checkpoint(self, write) -> None:
        write()

    def load_checkpoint_weights(self, checkpoint: str) -> None:
        self._load_from_checkpoint(checkpoint)

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler(super()._get_train_sampler(train_dataset))

    def _save_checkpoint(self, model, trial):
        self.save_checkpoint(lambda: super(TrainerHooks, self)._save_checkpoint(model, trial))


class HookedTrainer(TrainerHooks, Trainer):
    pass


class HookedDPOTrainer(TrainerHooks, DPOTrainer):
    """TRL's DPOTrainer (1.16) fed rows loraforge tokenized itself (prompt_ids, chosen_ids, rejected_ids):
    its private `_prepare_dataset` would look for text columns and tokenize again, so it passes them through."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the {dataset_name} rows lack {sorted(missing)}; loraforge tokenizes preference data itself")
        return dataset

    def drain_eval_metrics(self) -> dict:
        """The DPO metrics (rewards, log-probabilities) of an evaluation_loop, which TRL keeps in its private
        `_metrics` until the next `log`; read, averaged over batches, and cleared."""
        pending = self._metrics["eval"]
        found = {f"eval_{key}": sum(values) / len(values) for key, values in pending.items() if values}
        pending.clear()
        return found


def padding_free_collator(pad_token_id: int):
    """TRL's padding-free collator (packed rows, position ids restarting per sample); trl 1.16 exports it only
    from its sft_trainer module."""
    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the modules changed.

    On a CPU with AVX512-BF16, the first no-grad forward in eval mode (an evaluation, say) converts each
    Linear4bit weight to an inference-only layout; every later training step then gets zero gradients
    through those layers, with no error. bitsandbytes 0.50 decides that by the undocumented attribute
    `support_avx512bf16_for_cpu` of each Linear4bit; turning it off keeps evaluation and training correct.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
