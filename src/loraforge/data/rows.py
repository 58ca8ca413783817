"""Every row of every data source read and parsed by its format, as training takes them: no tokenizer, no model
library, so that `config validate` reads the rows `train` would refuse."""

import logging
from dataclasses import dataclass

from loraforge.data.bundle import DataStats
from loraforge.data.formats import PARSERS, Conversation, missing_optional_fields
from loraforge.data.sources import BadRow, read_rows
from loraforge.errors import DataError

log = logging.getLogger(__name__)

SHOWN_BAD_ROWS = 5


@dataclass
class Row:
    where: str
    conversation: Conversation
    source: int


def source_name(index: int, source) -> str:
    """A source as stats and messages name it: its path and its place, since two sources may share a path."""
    return f"{source.path} (data.sources[{index}])"


def load_rows(sources, system_prompt: str | None, on_bad_row: str, stats: DataStats) -> dict[str, list[Row]]:
    """Every row of every source, parsed; bad rows raise, or are skipped and counted with on_bad_row=skip."""
    splits: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    refused: list[str] = []
    for index, source in enumerate(sources):
        parse = PARSERS[source.format.value]
        read = bad = 0
        columns: set[str] = set()
        for where, row in read_rows(source.path, source.hub_split):
            read += 1
            if isinstance(row, dict):
                columns.update(row)
            try:
                if isinstance(row, BadRow):
                    raise row
                conversation = parse(row, where, source)
            except DataError as exc:
                message = f"{exc} (data.sources[{index}], format={source.format.value})"
                bad += 1
                if on_bad_row == "error":
                    refused.append(message)
                    continue
                if len(stats.bad_row_examples) < SHOWN_BAD_ROWS:
                    stats.bad_row_examples.append(message)
                continue
            splits[source.split].append(Row(where, conversation.with_system(system_prompt), index))
        if read == 0:
            holds = "an empty list" if source.path.lower().endswith(".json") else "only blank lines"
            raise DataError(f"{source.path}: no rows (data.sources[{index}]); the file holds {holds}")
        if read == bad and on_bad_row == "skip":
            raise DataError(f"{source.path}: all {read} rows are bad (data.sources[{index}]); first: {stats.bad_row_examples[0]}")
        for warning in missing_optional_fields(source, columns, source_name(index, source)):
            log.warning("%s", warning)
        stats.rows_read += read
        stats.bad_rows += bad
        stats.per_source[source_name(index, source)] = {"read": read, "bad": bad}
    if len(refused) == 1:
        raise DataError(f"{refused[0]}; set data.on_bad_row=skip to drop such rows")
    if refused:
        shown = "\n  ".join(refused[:SHOWN_BAD_ROWS])
        raise DataError(f"{len(refused)} bad rows, the first {min(len(refused), SHOWN_BAD_ROWS)}:\n  {shown}\nfix "
                        "them, or set data.on_bad_row=skip to drop such rows")
    if stats.bad_rows:
        log.warning("%d bad rows skipped (data.on_bad_row=skip); first ones:\n  %s", stats.bad_rows,
                    "\n  ".join(stats.bad_row_examples))
    return splits
