"""What building the data gives: the tokenized splits and the counts of what happened to every row."""

from dataclasses import dataclass, field


@dataclass
class DataStats:
    rows_read: int = 0
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    # Counts of each source under its path and place ("chat.jsonl (data.sources[0])").
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)
    train_rows: int = 0
    val_rows: int = 0
    test_rows: int = 0
    held_out_in_train: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    truncated_assistant: int = 0
    truncated_prompts: int = 0
    train_tokens: int = 0
    trainable_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)
    packed_rows: int | None = None
    packing_efficiency: float | None = None
    # Rows whose text holds a special token's text (<|im_end|>, say), which tokenizes as that control token.
    special_text_rows: int = 0
    special_text_examples: list[str] = field(default_factory=list)

    def count_drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        ratio = self.trainable_tokens / self.train_tokens if self.train_tokens else 0.0
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.dropped.items()) or "none"
        text = (
            f"{self.rows_read} rows read, {self.bad_rows} bad rows skipped, "
            f"{self.train_rows} train / {self.val_rows} validation / {self.test_rows} test; dropped: {dropped}; "
            f"{self.truncated} truncated{f', {self.truncated_prompts} prompts cut' if self.truncated_prompts else ''}; "
            f"{self.train_tokens} train tokens" + (f", {ratio:.0%} of them trained" if self.trainable_tokens else "")
        )
        if self.held_out_in_train:
            text += f"; {self.held_out_in_train} validation/test rows also in train"
        if self.special_text_rows:
            text += f"; {self.special_text_rows} rows hold special-token text"
        if self.packing_efficiency is not None:
            text += f"; packed into {self.packed_rows} rows, {self.packing_efficiency:.0%} full"
        return text


@dataclass
class DataBundle:
    train: object
    val: object | None
    test: object | None
    val_prompts: list[str]
    stats: DataStats
