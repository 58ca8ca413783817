"""Data files → conversations → seeded train/validation split → tokenized datasets."""

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.data.formats import PARSERS, Conversation
from loraforge.data.render import render
from loraforge.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    rows_read: int = 0
    train_rows: int = 0
    val_rows: int = 0
    dropped_too_long: int = 0
    train_tokens: int = 0
    trainable_tokens: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        ratio = self.trainable_tokens / self.train_tokens if self.train_tokens else 0.0
        return (
            f"{self.rows_read} rows read, {self.train_rows} train / {self.val_rows} validation, "
            f"{self.dropped_too_long} dropped as longer than max_length; "
            f"{self.train_tokens} train tokens, {ratio:.0%} of them trained"
        )


@dataclass
class DataBundle:
    train: object
    val: object | None
    val_conversations: list[Conversation]
    stats: DataStats


def read_jsonl(path: str | Path):
    """Yield (line number, object) for each non-blank line; a bad line raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (cwd is {Path.cwd()}); fix data.sources[].path")
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            yield number, row


def load_conversations(sources, system_prompt: str | None) -> tuple[list[Conversation], dict[str, int]]:
    conversations: list[Conversation] = []
    counts: dict[str, int] = {}
    for index, source in enumerate(sources):
        parse = PARSERS[getattr(source.format, "value", source.format)]
        before = len(conversations)
        for number, row in read_jsonl(source.path):
            where = f"{source.path}:{number}"
            try:
                conversation = parse(row, where)
            except DataError as exc:
                raise DataError(f"{exc} (data.sources[{index}], format={source.format.value})") from None
            conversations.append(conversation.with_system(system_prompt))
        counts[source.path] = len(conversations) - before
        if counts[source.path] == 0:
            raise DataError(f"{source.path}: no rows (data.sources[{index}]); the file is empty")
    return conversations, counts


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(items) - 1)
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def tokenize(conversations: list[Conversation], tokenizer, stop_ids, max_length: int):
    from datasets import Dataset

    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    dropped = 0
    for conversation in conversations:
        ids, labels = render(conversation, tokenizer, stop_ids)
        if len(ids) > max_length:
            dropped += 1
            continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
    return Dataset.from_dict(columns), dropped


def build_datasets(data_config, tokenizer, stop_ids, seed: int) -> DataBundle:
    conversations, counts = load_conversations(data_config.sources, data_config.system_prompt)
    train_conv, val_conv = split(conversations, data_config.val_fraction, seed)
    train, dropped_train = tokenize(train_conv, tokenizer, stop_ids, data_config.max_length)
    val, dropped_val = tokenize(val_conv, tokenizer, stop_ids, data_config.max_length) if val_conv else (None, 0)
    if val is not None and len(val):
        # Evaluation order does not matter, and length-sorted batches carry almost no padding.
        lengths = [len(ids) for ids in val["input_ids"]]
        val = val.select(sorted(range(len(val)), key=lengths.__getitem__))
    if len(train) == 0:
        raise DataError(
            f"no training rows left: all {len(train_conv)} are longer than data.max_length={data_config.max_length}; "
            "raise data.max_length"
        )
    stats = DataStats(
        rows_read=len(conversations),
        train_rows=len(train),
        val_rows=len(val) if val is not None else 0,
        dropped_too_long=dropped_train + dropped_val,
        train_tokens=sum(len(x) for x in train["input_ids"]),
        trainable_tokens=sum(sum(1 for t in x if t != -100) for x in train["labels"]),
        per_source=counts,
    )
    if stats.dropped_too_long:
        log.warning("%d samples longer than data.max_length=%d were dropped", stats.dropped_too_long, data_config.max_length)
    return DataBundle(train=train, val=val if val is not None and len(val) else None, val_conversations=val_conv, stats=stats)
