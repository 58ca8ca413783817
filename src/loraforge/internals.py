"""Every use of a library's private methods, attributes or module paths, in one place.

A library upgrade can change any of these without an error, only wrong numbers, so each is named here with
the version it was checked against, and tests/test_internals.py fails loudly when one of them changes. The
rest of loraforge reaches them only through this module.
"""

import bitsandbytes as bnb
from transformers import Trainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

CHECKED_AGAINST = {"transformers": "5.23", "bitsandbytes": "0.50", "trl": "1.16"}


class HookedTrainer(Trainer):
    """HF's Trainer with three private steps behind public hooks (transformers 5.23):

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
        self.save_checkpoint(lambda: super(HookedTrainer, self)._save_checkpoint(model, trial))


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
