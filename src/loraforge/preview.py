"""`loraforge data preview`: samples as the model sees them, trained tokens marked, then the data stats."""

import logging
import sys
from collections import Counter
from contextlib import contextmanager

from loraforge.data.build import DataStats, split_rows, tokenize_preference, tokenize_rows
from loraforge.data.render import IGNORE
from loraforge.training.prepare import prepare

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def format_sample(ids: list[int], labels: list[int], tokenizer, color: bool) -> str:
    """Trained tokens bright green (or inside [[ ]] without colour), masked ones dim (or plain)."""
    out, run, trained = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        if color:
            out.append((GREEN if trained else DIM) + text + RESET)
        else:
            out.append(f"{OPEN}{text}{CLOSE}" if trained else text)

    for token, label in zip(ids, labels):
        is_trained = label != IGNORE
        if is_trained != trained:
            flush()
            run, trained = [], is_trained
        run.append(token)
    flush()
    return "".join(out)


def format_stats(stats, max_length: int, label_counts: dict[str, int] | None = None) -> str:
    """label_counts: a classification run's training rows per label, in place of trained tokens (a classifier
    trains on its label, not on tokens)."""
    lines = [
        f"rows read           {stats.rows_read}",
        f"bad rows skipped    {stats.bad_rows}",
        f"kept                {stats.train_rows + stats.val_rows + stats.test_rows} "
        f"(train / val / test {stats.train_rows} / {stats.val_rows} / {stats.test_rows})",
        f"dropped             {', '.join(f'{k}: {v}' for k, v in stats.dropped.items()) or 'none'}",
        f"truncated           {stats.truncated} ({stats.truncated_assistant} inside an assistant turn"
        + (f", {stats.truncated_prompts} prompts" if stats.truncated_prompts else "") + ")",
        "token length        " + ", ".join(f"{k} {v}" for k, v in stats.length_percentiles.items())
        + f" (max_length {max_length})",
        f"trained tokens      {stats.trainable_tokens} of {stats.train_tokens} "
        f"({stats.trainable_tokens / max(stats.train_tokens, 1):.1%})" if label_counts is None else
        "training labels     " + ", ".join(f"{label} {count}" for label, count in label_counts.items()),
    ]
    if stats.packing_efficiency is not None:
        lines.append(f"packing             {stats.packed_rows} rows, {stats.packing_efficiency:.1%} of their tokens used")
    for name, counts in stats.per_source.items():
        lines.append(f"source {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for example in stats.bad_row_examples:
        lines.append(f"bad row: {example}")
    return "\n".join(lines)


def run_preview(config, n: int, stream=None) -> None:
    stream = stream or sys.stdout
    color = stream.isatty()
    prepared = prepare(config, cache=False)
    tokenizer, stop_ids = prepared.tokenizer, prepared.stop_ids

    if config.task == "classification":
        return _preview_classification(prepared, config, n, stream)
    shown_stats = DataStats()
    with _quiet("loraforge.data"):  # prepare() has said what reading the sources found
        train_rows, val_rows, _ = split_rows(config.data, config.seed, shown_stats)
    split = "training" if train_rows else "validation"
    legend = f"{GREEN}trained{RESET} {DIM}masked{RESET}" if color else f"{OPEN}trained{CLOSE} masked"
    tokenize = tokenize_preference if config.data.is_preference() else tokenize_rows
    rows, shown = _first_kept(train_rows or val_rows, n, lambda chunk: tokenize(chunk, tokenizer, stop_ids, config.data,
                                                                                 shown_stats))
    if config.data.is_preference():
        unpaired = config.data.is_unpaired()
        print(f"{len(rows)} {split} {'unpaired rows' if unpaired else 'pairs'}, as training draws them ({legend}):",
              file=stream)
        for found, row in zip(rows, shown):
            prompt = found["prompt_ids"]
            sides = ({"desirable" if found["label"] else "undesirable": "completion_ids"} if unpaired
                     else {"chosen": "chosen_ids", "rejected": "rejected_ids"})
            for side, column in sides.items():
                answer = found[column]
                print(f"\n--- {row.where} {side} ({len(prompt)} prompt + {len(answer)} answer tokens)", file=stream)
                print(format_sample(prompt + answer, [IGNORE] * len(prompt) + answer, tokenizer, color), file=stream)
        print("\n" + format_stats(prepared.stats, config.data.max_length), file=stream)
        return
    print(f"{len(rows)} {split} samples, as training draws them ({legend}):", file=stream)
    for sample, row in zip(rows, shown):
        print(f"\n--- {row.where} ({len(sample['input_ids'])} tokens)", file=stream)
        print(format_sample(sample["input_ids"], sample["labels"], tokenizer, color), file=stream)
    print("\n" + format_stats(prepared.stats, config.data.max_length), file=stream)


def _first_kept(rows: list, n: int, tokenize) -> tuple[list[dict], list]:
    """The first n rows that tokenize into samples (rows dropped as too long, say, are passed over), and theirs."""
    samples, kept = [], []
    step = max(n, 16)
    for start in range(0, len(rows), step):
        if len(samples) >= n:
            break
        dataset, chunk_kept = tokenize(rows[start : start + step])
        samples += [dataset[i] for i in range(len(dataset))]
        kept += chunk_kept
    return samples[:n], kept[:n]


def _preview_classification(prepared, config, n: int, stream) -> None:
    """A classifier reads the text alone, no chat template, and learns its label."""
    train = prepared.train
    print(f"{min(n, len(train))} samples (text as the classifier reads it, then its label):", file=stream)
    for index in range(min(n, len(train))):
        ids = train[index]["input_ids"]
        print(f"\n--- training row {index} ({len(ids)} tokens), label {prepared.labels[train[index]['labels']]}",
              file=stream)
        print(prepared.tokenizer.decode(ids), file=stream)
    counts = Counter(prepared.labels[label] for label in train["labels"])
    print("\n" + format_stats(prepared.stats, config.data.max_length, {l: counts[l] for l in prepared.labels}),
          file=stream)


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
