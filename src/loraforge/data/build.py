"""Sources → rows → Conversations → seeded splits and weights → tokenized, checked datasets."""

import logging
import random

from loraforge.data import cache
from loraforge.data.bundle import DataBundle, DataStats
from loraforge.data.checks import check_trainable
from loraforge.data.formats import Conversation, Preference, Unpaired
from loraforge.data.packing import pack
from loraforge.data.render import IGNORE, render, render_answers
from loraforge.data.rows import Row, load_rows, source_name
from loraforge.errors import DataError

log = logging.getLogger(__name__)


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0:
        n_val = min(max(n_val, 1), len(items) - 1)
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def split_by_prompt(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """split(); preference rows that share a prompt stay on one side, so no held-out prompt was trained on."""
    if not rows or not isinstance(rows[0].conversation, (Preference, Unpaired)):
        return split(rows, fraction, seed)
    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(tuple((m.role, m.content) for m in row.conversation.prompt), []).append(index)
    train_groups, val_groups = split(list(groups.values()), fraction, seed)
    held = {i for group in val_groups for i in group}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def conversation_key(conversation: Conversation | Preference | Unpaired) -> tuple:
    """What makes two rows the same conversation: the same text, or the same roles and contents in order."""
    if isinstance(conversation, (Preference, Unpaired)):
        parts = (conversation.prompt, *conversation.answers().values())
        return (*(tuple((m.role, m.content) for m in part) for part in parts), getattr(conversation, "desirable", None))
    if conversation.text is not None:
        return ("text", conversation.text)
    return tuple((m.role, m.content) for m in conversation.messages)


def drop_duplicates(rows: list[Row], held_out: list[Row], stats: DataStats) -> list[Row]:
    """rows without repeats (the first kept) and without any row that a held-out split holds."""
    seen = {conversation_key(r.conversation) for r in held_out}
    kept = []
    for row in rows:
        key = conversation_key(row.conversation)
        if key in seen:
            stats.count_drop("duplicate")
            continue
        seen.add(key)
        kept.append(row)
    return kept


def count_held_out_in_train(train: list[Row], held_out: list[Row]) -> int:
    keys = {conversation_key(r.conversation) for r in train}
    return sum(1 for r in held_out if conversation_key(r.conversation) in keys)


def assign_splits(splits: dict[str, list[Row]], data_config, seed: int, stats: DataStats) -> tuple[list[Row], ...]:
    """(train, validation, test) rows. Sources marked val or test are those splits; without one, a seeded
    data.test_fraction and then data.val_fraction of the training rows are held out. data.dedupe applies first."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    if data_config.dedupe:
        train = drop_duplicates(train, [*val, *test], stats)
    if not test and data_config.test_fraction:
        train, test = split_by_prompt(train, data_config.test_fraction, seed + 1)
    if not val:
        train, val = split_by_prompt(train, data_config.val_fraction, seed)
    stats.held_out_in_train = count_held_out_in_train(train, [*val, *test])
    return train, val, test


def apply_weights(rows: list[Row], weights: list[float], seed: int) -> list[Row]:
    """Repeat or subsample each source's rows to weight × count (seeded); weight 1 keeps rows as they are."""
    rng = random.Random(seed)
    out: list[Row] = []
    for index, weight in enumerate(weights):
        own = [r for r in rows if r.source == index]
        target = round(len(own) * weight)
        full, rest = divmod(target, len(own)) if own else (0, 0)
        out.extend(own * full)
        out.extend(own[i] for i in sorted(rng.sample(range(len(own)), rest)))
    return out


def special_texts(tokenizer) -> list[str]:
    """The text of every special token the tokenizer turns into a control token wherever it occurs in text."""
    return sorted({token.content for token in tokenizer.added_tokens_decoder.values() if token.special and token.content})


def row_texts(record) -> list[str]:
    """Every text a record holds: a conversation's messages (or its text), a preference row's prompt and answers."""
    if hasattr(record, "answers"):
        return [m.content for turns in (record.prompt, *record.answers().values()) for m in turns]
    return [record.text] if record.text is not None else [m.content for m in record.messages]


def note_special_text(row: Row, specials: list[str], stats: DataStats) -> None:
    found = sorted({token for text in row_texts(row.conversation) for token in specials if token in text})
    if found:
        stats.special_text_rows += 1
        if len(stats.special_text_examples) < 3:
            stats.special_text_examples.append(f"{row.where} ({', '.join(found)})")


def longest_token(tokenizer) -> int:
    """The most characters one vocabulary entry has. An entry spells at most as many characters of text as it has
    (byte-level entries one a byte, SentencePiece's ▁ a space, byte fallback <0xNN> one byte in six), so a text of
    more than 2 x limit x this many characters is over limit tokens whatever the tokenizer makes of it (2: room for
    normalizers that join characters)."""
    return max(map(len, tokenizer.get_vocab()), default=1)


def tokenize_rows(rows: list[Row], tokenizer, stop_ids, data_config, stats: DataStats):
    """The tokenized rows and, in the same order, the rows they came from. A row over data.max_length by its
    characters alone (longest_token) is dropped, or refused, without being tokenized: a 36 MB row took minutes
    and 7 GB to tokenize only to be dropped."""
    from datasets import Dataset

    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    kept: list[Row] = []
    limit = data_config.max_length
    specials = special_texts(tokenizer)
    most_characters = 2 * limit * longest_token(tokenizer)
    for row in rows:
        note_special_text(row, specials, stats)
        characters = sum(len(text.strip()) for text in row_texts(row.conversation))
        if characters > most_characters and data_config.truncation != "truncate":
            if data_config.truncation == "error":
                raise DataError(f"{row.where}: {characters} characters, far more than data.max_length={limit} tokens; "
                                "raise data.max_length or set data.truncation to drop or truncate")
            stats.count_drop("too_long")
            continue
        try:
            ids, labels = render(row.conversation, tokenizer, stop_ids, data_config.masking.value)
        except DataError as exc:
            raise DataError(f"{row.where}: {exc}") from None
        cut = False
        if len(ids) > limit:
            if data_config.truncation == "error":
                raise DataError(
                    f"{row.where}: {len(ids)} tokens, more than data.max_length={limit}; raise data.max_length "
                    "or set data.truncation to drop or truncate"
                )
            if data_config.truncation == "drop":
                stats.count_drop("too_long")
                continue
            cut_assistant = any(label != IGNORE for label in labels[limit:])
            ids, labels, cut = ids[:limit], labels[:limit], True
            if any(label != IGNORE for label in labels[1:]):
                stats.truncated += 1
                stats.truncated_assistant += cut_assistant
        if all(label == IGNORE for label in labels[1:]):
            stats.count_drop("answer_beyond_max_length" if cut else "no_trainable_tokens")
            continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
        kept.append(row)
    return Dataset.from_dict(columns), kept


def tokenize_preference(rows: list[Row], tokenizer, stop_ids, data_config, stats: DataStats):
    """Preference rows as prompt_ids and, for pairs, chosen_ids and rejected_ids, for unpaired rows completion_ids
    and label. Under data.truncation (error, drop or truncate) a row over data.max_length (prompt and longest
    answer), or a prompt over data.max_prompt_length, is an error, dropped, or cut: the prompt keeps its end (the
    turn being answered; the start, system turn included, goes) down to max_prompt_length, or else to what the
    longest answer leaves but at least half of max_length, then answers are cut to what is left. Every cut and drop
    is counted."""
    from datasets import Dataset

    unpaired = data_config.is_unpaired()
    names = ("completion",) if unpaired else ("chosen", "rejected")
    columns: dict[str, list] = {"prompt_ids": [], **{f"{name}_ids": [] for name in names}}
    if unpaired:
        columns["label"] = []
    kept: list[Row] = []
    limit, prompt_limit = data_config.max_length, data_config.max_prompt_length
    specials = special_texts(tokenizer)
    for row in rows:
        note_special_text(row, specials, stats)
        try:
            prompt, answers = render_answers(row.conversation.prompt, row.conversation.answers(), tokenizer, stop_ids)
        except DataError as exc:
            raise DataError(f"{row.where}: {exc}") from None
        longest_answer = max(map(len, answers))
        prompt_over = prompt_limit is not None and len(prompt) > prompt_limit
        if prompt_over or len(prompt) + longest_answer > limit:
            what = (f"prompt {len(prompt)} tokens (data.max_prompt_length={prompt_limit})" if prompt_over
                    else f"prompt and answer {len(prompt) + longest_answer} tokens (data.max_length={limit})")
            if data_config.truncation == "error":
                raise DataError(f"{row.where}: {what}; raise the limit or set data.truncation to drop or truncate")
            if data_config.truncation == "drop":
                stats.count_drop("too_long")
                continue
            keep = prompt_limit if prompt_limit is not None else max(limit // 2, limit - longest_answer)
            if len(prompt) > keep:
                prompt = prompt[len(prompt) - keep:]
                stats.truncated_prompts += 1
            room = limit - len(prompt)
            if longest_answer > room:
                answers = [answer[:room] for answer in answers]
                stats.truncated += 1
                stats.truncated_assistant += 1
        if len(answers) == 2 and answers[0] == answers[1]:
            # Answers that differ in text may render to the same tokens (a template that trims), or become the same
            # once cut to data.max_length: such a pair teaches nothing.
            stats.count_drop("identical_answers")
            continue
        columns["prompt_ids"].append(prompt)
        for name, answer in zip(names, answers):
            columns[f"{name}_ids"].append(answer)
        if unpaired:
            columns["label"].append(row.conversation.desirable)
        kept.append(row)
    return Dataset.from_dict(columns), kept


def refuse_emptied_sources(data_config, before: list[Row], after: list[Row]) -> None:
    """A source that had rows going into tokenization and has none coming out is an error, not a quiet gap
    (a validation file whose every row is too long would otherwise leave the run without evaluation)."""
    had = {r.source for r in before}
    has = {r.source for r in after}
    for index in sorted(had - has):
        source = data_config.sources[index]
        count = sum(1 for r in before if r.source == index)
        raise DataError(
            f"{source.path} (data.sources[{index}], split: {source.split}): all {count} rows were dropped (longer "
            f"than data.max_length={data_config.max_length}, or nothing to train under data.masking="
            f"{data_config.masking.value}); raise data.max_length, set data.truncation: truncate, or remove the source"
        )


def refuse_emptied_splits(data_config, splits: dict[str, tuple[int, int]]) -> None:
    """A validation or test split drawn with rows and left with none after tokenization is an error: the run
    would go on without that evaluation, and eval_every would do nothing. splits: name -> (rows drawn, rows kept)."""
    for name, (drawn, kept) in splits.items():
        if drawn and not kept:
            raise DataError(
                f"all {drawn} {name} rows were dropped (longer than data.max_length={data_config.max_length}, "
                f"or nothing to train under data.masking={data_config.masking.value}), so the run would have no "
                f"{name} loss; raise data.max_length, set data.truncation: truncate, or draw more rows (data.val_fraction"
                ", data.test_fraction)"
            )


def build_datasets(data_config, tokenizer, stop_ids, seed: int, cache_dir=None) -> DataBundle:
    """Tokenized splits; with data.cache and a cache_dir, reused when every input is unchanged."""
    if not (data_config.cache and cache_dir):
        return _build(data_config, tokenizer, stop_ids, seed)
    key = cache.cache_key(data_config, seed, tokenizer, stop_ids)
    bundle = cache.load(cache_dir, key)
    if bundle is not None:
        log.info("tokenized data loaded from cache %s (inputs unchanged, tokenization skipped)", key)
        return bundle
    bundle = _build(data_config, tokenizer, stop_ids, seed)
    try:
        cache.save(cache_dir, key, bundle)
    except OSError as exc:
        log.warning("the tokenized data cannot be cached in %s (%s), so the next run tokenizes it again; free space "
                    "there, set LORAFORGE_HOME to a writable folder, or set data.cache: false", cache_dir,
                    exc.strerror or exc)
        return bundle
    log.info("tokenized data cached as %s", key)
    return bundle


def _first_user_prompt(conversation: Conversation | Preference | Unpaired) -> str | None:
    messages = conversation.messages if isinstance(conversation, Conversation) else conversation.prompt
    return next((m.content for m in messages if m.role == "user"), None)


def count_splits(stats: DataStats, train, val, test, lengths: list[int]) -> None:
    """Rows per split and the training rows' length percentiles (lengths sorted)."""
    stats.train_rows = len(train)
    stats.val_rows = len(val) if val is not None else 0
    stats.test_rows = len(test) if test is not None else 0
    stats.length_percentiles = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (50, 90, 99)}
    stats.length_percentiles["max"] = lengths[-1]


def _bundle(train, val, test, val_rows: list[Row], stats: DataStats) -> DataBundle:
    return DataBundle(
        train=train,
        val=val if val is not None and len(val) else None,
        test=test,
        # Unpaired preference rows repeat a prompt for each of its answers: each prompt once.
        val_prompts=list(dict.fromkeys(p for p in (_first_user_prompt(r.conversation) for r in val_rows) if p is not None)),
        stats=stats,
    )


def _preference_bundle(train, val, test, val_rows: list[Row], stats: DataStats) -> DataBundle:
    """Preference splits: a row's length is its prompt and its longest answer; every answer is trained, each after
    its own copy of the prompt."""
    names = [name for name in train.column_names if name.endswith("_ids") and name != "prompt_ids"]
    rows = list(zip(train["prompt_ids"], zip(*(train[name] for name in names))))
    count_splits(stats, train, val, test, sorted(len(p) + max(map(len, answers)) for p, answers in rows))
    stats.train_tokens = sum(len(p) * len(answers) + sum(map(len, answers)) for p, answers in rows)
    stats.trainable_tokens = sum(sum(map(len, answers)) for _, answers in rows)
    kind = "rows" if names == ["completion_ids"] else "pairs"
    if stats.dropped:
        log.warning("dropped %s: %s", kind, stats.dropped)
    if stats.truncated or stats.truncated_prompts:
        log.warning("%d prompts lost their start, %d %s had answers cut to data.max_length (data.truncation: "
                    "truncate)", stats.truncated_prompts, stats.truncated, kind)
    return _bundle(train, val, test, val_rows, stats)


def split_rows(data_config, seed: int, stats: DataStats) -> tuple[list[Row], list[Row], list[Row]]:
    """(train, validation, test) rows as training draws them: read, split, deduplicated and weighted, in order."""
    splits = load_rows(data_config.sources, data_config.system_prompt, data_config.on_bad_row, stats)
    train_rows, val_rows, test_rows = assign_splits(splits, data_config, seed, stats)
    if stats.held_out_in_train:
        log.warning("%d validation/test rows are also training rows (exact duplicates), so evaluation is optimistic; "
                    "data.dedupe: true drops them from training", stats.held_out_in_train)
    weighted = apply_weights(train_rows, [s.weight for s in data_config.sources], seed)
    for index, source in enumerate(data_config.sources):
        had, kept = (sum(1 for r in rows if r.source == index) for rows in (train_rows, weighted))
        stats.per_source[source_name(index, source)]["train_after_weight"] = kept
        if had and not kept:
            log.warning("%s (data.sources[%d]) gives no training rows: weight %g of its %d rows rounds to none; raise "
                        "its weight", source.path, index, source.weight, had)
    return weighted, val_rows, test_rows


def _build(data_config, tokenizer, stop_ids, seed: int) -> DataBundle:
    stats = DataStats()
    train_rows, val_rows, test_rows = split_rows(data_config, seed, stats)

    preference = data_config.is_preference()
    tokenize = tokenize_preference if preference else tokenize_rows
    train, train_kept = tokenize(train_rows, tokenizer, stop_ids, data_config, stats)
    if len(train) == 0:
        raise DataError(
            f"no training rows left of {len(train_rows)}: dropped {stats.dropped}; "
            + (f"raise data.max_length (now {data_config.max_length}) or check data.masking" if train_rows else
               "no training rows came out of the sources (data.sources[].weight rounds a source to round(weight x "
               "rows), and data.dedupe drops training rows that are also validation or test rows)")
        )
    val, val_kept = tokenize(val_rows, tokenizer, stop_ids, data_config, stats) if val_rows else (None, [])
    test, test_kept = tokenize(test_rows, tokenizer, stop_ids, data_config, stats) if test_rows else (None, [])
    if stats.special_text_rows:
        log.warning("%d rows hold the text of a special token inside a message, which tokenizes as that control token "
                    "(an end of turn in the middle of an answer, say), not as text; clean the data or check it is "
                    "meant; first: %s", stats.special_text_rows, "; ".join(stats.special_text_examples))
    refuse_emptied_sources(data_config, [*train_rows, *val_rows, *test_rows], [*train_kept, *val_kept, *test_kept])
    refuse_emptied_splits(data_config, {"validation": (len(val_rows), len(val_kept)),
                                        "test": (len(test_rows), len(test_kept))})
    if preference:
        return _preference_bundle(train, val, test, val_rows, stats)
    check_trainable(train, [r.where for r in train_kept], tokenizer, stop_ids, data_config)

    lengths = sorted(len(ids) for ids in train["input_ids"])
    count_splits(stats, train, val, test, lengths)
    stats.train_tokens = sum(lengths)
    stats.trainable_tokens = sum(sum(1 for t in x if t != IGNORE) for x in train["labels"])
    if len(data_config.sources) > 1:
        for name, counts in stats.per_source.items():
            log.info("source %s: %s", name, ", ".join(f"{k} {v}" for k, v in counts.items()))
    if stats.dropped:
        limits = (f" (data.truncation={data_config.truncation}, data.max_length={data_config.max_length})"
                  if "too_long" in stats.dropped else "")
        log.warning("dropped samples: %s%s", stats.dropped, limits)
    if stats.truncated_assistant:
        log.warning("%d samples lost part of an assistant turn to truncation; raise data.max_length", stats.truncated_assistant)

    if data_config.packing:
        train = pack(train, data_config.max_length)
        stats.packed_rows = len(train)
        stats.packing_efficiency = stats.train_tokens / (len(train) * data_config.max_length)
    if val is not None and len(val):
        # Evaluation order does not matter, and length-sorted batches carry almost no padding.
        val_lengths = [len(ids) for ids in val["input_ids"]]
        val = val.select(sorted(range(len(val)), key=val_lengths.__getitem__))
    return _bundle(train, val, test, val_rows, stats)
