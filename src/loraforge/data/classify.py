"""Classification data: text → token ids, label → id, with the label set and class weights."""

import logging
from collections import Counter

from loraforge.data.build import DataStats, apply_weights, assign_splits, count_splits, refuse_emptied_splits
from loraforge.data.rows import load_rows
from loraforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def label_set(train_labels: list[str], given: list[str] | None) -> list[str]:
    if given is not None:
        unknown = sorted(set(train_labels) - set(given))
        if unknown:
            raise DataError(f"training labels {unknown} are not in classification.labels {given}; add them")
        return list(given)
    return sorted(set(train_labels))


def class_weights(train_labels: list[str], labels: list[str], setting) -> list[float] | None:
    """None (unweighted), balanced weights n / (k x count) for auto, or the given {label: weight}."""
    if setting == "none":
        return None
    if setting == "auto":
        counts = Counter(train_labels)
        missing = [label for label in labels if not counts[label]]
        if missing:
            raise DataError(f"class_weights auto: labels {missing} have no training rows")
        return [len(train_labels) / (len(labels) * counts[label]) for label in labels]
    unknown = sorted(set(setting) - set(labels))
    if unknown:
        raise ConfigError([f"classification.class_weights names unknown labels {unknown}; labels are {labels}"])
    return [float(setting.get(label, 1.0)) for label in labels]


def build_classification(data_config, classification, tokenizer, seed: int):
    """(train, val, labels, weights, stats); val may be None."""
    from datasets import Dataset

    stats = DataStats()
    splits = load_rows(data_config.sources, None, data_config.on_bad_row, stats)
    train_rows, val_rows, test_rows = assign_splits(splits, data_config, seed, stats)
    train_rows = apply_weights(train_rows, [s.weight for s in data_config.sources], seed)
    labels = label_set([r.conversation.label for r in train_rows], classification.labels)
    label_ids = {label: i for i, label in enumerate(labels)}

    def encode(rows):
        columns = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            ids = tokenizer(row.conversation.messages[0].content)["input_ids"]
            if len(ids) > data_config.max_length:
                if data_config.truncation == "error":
                    raise DataError(f"{row.where}: {len(ids)} tokens, more than data.max_length={data_config.max_length}")
                if data_config.truncation == "drop":
                    stats.count_drop("too_long")
                    continue
                ids = ids[: data_config.max_length]
                stats.truncated += 1
            if row.conversation.label not in label_ids:
                raise DataError(f"{row.where}: label {row.conversation.label!r} does not occur in the training data {labels}")
            columns["input_ids"].append(ids)
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append(label_ids[row.conversation.label])
        return Dataset.from_dict(columns)

    train = encode(train_rows)
    if len(train) == 0:
        raise DataError(f"no training rows left of {len(train_rows)}: dropped {stats.dropped}; raise data.max_length "
                        f"(now {data_config.max_length}) or set data.truncation: truncate")
    val = encode(val_rows) if val_rows else None
    refuse_emptied_splits(data_config, {"validation": (len(val_rows), len(val) if val is not None else 0)})
    weights = class_weights([r.conversation.label for r in train_rows], labels, classification.class_weights)
    count_splits(stats, train, val, None, sorted(len(x) for x in train["input_ids"]))
    stats.test_rows = len(test_rows)
    stats.train_tokens = sum(len(x) for x in train["input_ids"])
    return train, val, labels, weights, stats
