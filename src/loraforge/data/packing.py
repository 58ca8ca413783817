"""Rows → batches: padded to the longest in the batch, or packed several to a row with position ids
restarting per sample so that no sample attends to another."""

from loraforge.data.render import IGNORE
from loraforge.internals import padding_free_collator


def pack(dataset, max_length: int):
    """Best-fit-decreasing packing (TRL) into rows of at most max_length; keeps per-sample lengths."""
    from trl import pack_dataset

    return pack_dataset(dataset.remove_columns(["attention_mask"]), max_length, strategy="bfd")


def collator(tokenizer, packed: bool):
    """The batch builder training uses. Padding is masked by position, never by pad id (pad may equal EOS)."""
    if packed:
        return padding_free_collator(tokenizer.pad_token_id)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
