"""The data section of the config: sources, their format and fields, and how samples become tokens."""

import os
from enum import Enum
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from loraforge.config.section import Section
from loraforge.data.formats import FORMAT_FIELDS, PREFERENCE_FORMATS

# The format registry lives with the parsers (data/formats.py); the config offers exactly its names.
DataFormat = Enum("DataFormat", {name: name for name in FORMAT_FIELDS}, type=str)


def label_text(value):
    """A label as the data reads one: a whole number is its text (1 is "1"); true and false are no label."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Label = Annotated[str, BeforeValidator(label_text)]


class Masking(str, Enum):
    assistant = "assistant"
    last_assistant = "last_assistant"
    all = "all"


class DataSource(Section):
    path: str = Field(
        description="A .jsonl, .json, .csv or .parquet file (relative paths are read from the current directory), "
        "or a Hugging Face hub dataset name (needs a network, or the dataset in the local hub cache); a leading ~ is "
        "the home folder."
    )
    format: DataFormat = Field(
        DataFormat.messages,
        description="messages: {'messages': [{'role', 'content', 'train'?}]}; sharegpt: {'conversations': "
        "[{'from', 'value'}]}; alpaca: {'instruction', 'input', 'output'}; prompt_completion: {'prompt', "
        "'completion'}; classification: {'text', 'label'}; text: {'text'} trained on every token; preference: "
        "{'prompt', 'chosen', 'rejected'} (text or message lists) or {'messages', 'chosen', 'rejected'}, for "
        "method dpo, orpo or kto; unpaired_preference: {'prompt', 'completion', 'label'} (label true for a "
        "desirable answer, false for an undesirable one), for method kto.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Column names of this file for the format's fields, e.g. {instruction: question, output: answer}.",
    )
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt: speaker names of this file mapped to system, user or assistant "
        "(added to the defaults human->user, gpt->assistant, system->system).",
    )
    weight: float = Field(
        1.0, gt=0, le=1000, description="Sampling weight of this source's training rows: 2 repeats every row twice, "
        "0.5 keeps a seeded half."
    )
    split: Literal["train", "val", "test"] = Field(
        "train", description="Which split this source feeds; a val source replaces data.val_fraction."
    )
    hub_split: str = Field("train", description="Split to read when path is a hub dataset.")
    labels: list[Label] | None = Field(
        None, description="classification: the allowed labels (whole numbers are read as their text, as in the "
        "data); a row with another label is a bad row."
    )

    @field_validator("path")
    @classmethod
    def _home(cls, value: str) -> str:
        return os.path.expanduser(value)

    @model_validator(mode="after")
    def _known_fields(self):
        allowed = FORMAT_FIELDS[self.format.value]
        unknown = [k for k in self.fields if k not in allowed]
        if unknown:
            raise ValueError(
                f"fields {unknown} are not fields of format {self.format.value}; map these: {', '.join(allowed)}"
            )
        bad_roles = {k: v for k, v in self.roles.items() if v not in ("system", "user", "assistant")}
        if bad_roles:
            raise ValueError(f"roles must map to system, user or assistant, got {bad_roles}")
        return self


class DataConfig(Section):
    sources: list[DataSource] = Field(min_length=1, description="Data files to train on, in order.")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of training rows held out for evaluation (seeded split) "
        "when no source has split: val."
    )
    test_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of training rows held out as a test split (seeded) when no source has "
        "split: test; evaluated once, with the run's final weights, at the end of training."
    )
    system_prompt: str | None = Field(
        None, description="System message put before every conversation that has none; null keeps the template's default."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template text (it holds {{ or {%), or the path of a file holding it (any "
        "extension), used instead of the tokenizer's; "
        "it is saved with the run so chat and export use the same one."
    )
    max_length: int = Field(512, ge=8, description="Longest sample in tokens (preference data: the prompt and its "
                            "longer answer).")
    max_prompt_length: int | None = Field(
        None, ge=1, description="preference data: longest prompt in tokens (a longer one is dropped, an error, or "
        "keeps its end, as data.truncation says); null: only max_length applies, and truncate cuts the prompt to "
        "what the longer answer leaves, keeping at least half of max_length."
    )
    truncation: Literal["drop", "truncate", "error"] = Field(
        "drop", description="What a sample longer than max_length gets: dropped and counted, cut to max_length, "
        "or an error naming the row."
    )
    masking: Masking = Field(
        Masking.assistant,
        description="Which tokens are trained: every assistant turn (assistant), the last one only "
        "(last_assistant), or every token (all). A message with \"train\": false is never trained.",
    )
    packing: bool = Field(
        False, description="Put several samples in one row of max_length, each attending only to itself. "
        "train.batch_size then counts such rows, and a batch is attended over as one sequence: on CPU this is "
        "slower than the default length-grouped batches."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error stops before training at the first bad row; skip drops bad rows, counts "
        "them and lists the first few."
    )
    dedupe: bool = Field(
        False, description="Drop exact duplicate conversations (same messages, or same text) before splitting, "
        "keeping the first, and drop from training any row that a validation or test source also holds. "
        "Without it such rows are only counted and reported."
    )
    cache: bool = Field(True, description="Reuse tokenized data when files, tokenizer, template and settings match.")

    def is_preference(self) -> bool:
        """Data of a preference method: pairs, or unpaired labelled answers."""
        return any(s.format.value in PREFERENCE_FORMATS for s in self.sources)

    def is_unpaired(self) -> bool:
        return any(s.format.value == "unpaired_preference" for s in self.sources)

    @model_validator(mode="after")
    def _something_left_to_train(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction ({self.val_fraction:g}) and test_fraction ({self.test_fraction:g}) hold "
                             "out every row; together they must stay below 1")
        formats = {s.format.value for s in self.sources}
        if formats & PREFERENCE_FORMATS and formats - PREFERENCE_FORMATS:
            raise ValueError(f"sources mix preference data with {sorted(formats - PREFERENCE_FORMATS)}; a run trains "
                             "on one kind (method sft or a preference method), so give each its own config")
        if {"preference", "unpaired_preference"} <= formats:
            raise ValueError("sources mix preference pairs with unpaired_preference rows; write each pair as two "
                             "unpaired rows (chosen with label true, rejected with label false) or use one format")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) leaves no room for an answer within "
                             f"max_length ({self.max_length}); make it smaller")
        if formats & PREFERENCE_FORMATS and self.packing:
            raise ValueError("packing does not apply to preference data; set data.packing: false")
        return self
