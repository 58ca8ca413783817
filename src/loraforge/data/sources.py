"""Rows out of a source, each with where it came from: JSONL/JSON by hand (for line numbers), CSV,
Parquet and hub datasets through `datasets`."""

import json
import re
from pathlib import Path

from loraforge.errors import DataError

BOM = b"\xef\xbb\xbf"


class BadRow(DataError):
    """A row that cannot be parsed; skipped with data.on_bad_row=skip."""


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def missing_files(sources) -> list[str]:
    """One line per data.sources entry naming a local file that is not there (hub datasets are not checked)."""
    return [f"data.sources[{i}].path: {source.path}: data file not found (cwd is {Path.cwd()})"
            for i, source in enumerate(sources)
            if Path(source.path).suffix.lower() in FILE_SUFFIXES and not Path(source.path).is_file()]


def read_rows(path: str, hub_split: str = "train"):
    """Yield (where, row) pairs; `where` is "file:line" for JSONL/CSV, "file: row N" otherwise.

    A row that is not a JSON object comes as a BadRow value (not raised), so that reading can go on
    past it when bad rows are skipped; problems with the whole file are raised as DataError.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in FILE_SUFFIXES:
        if not file.is_file():
            raise DataError(f"{file}: data file not found (cwd is {Path.cwd()}); fix data.sources[].path")
        if file.stat().st_size == 0:
            raise DataError(f"{file}: the file is empty; point data.sources[].path at a file with rows")
    if suffix == ".jsonl":
        yield from _jsonl(file)
    elif suffix == ".json":
        yield from _json(file)
    elif suffix in (".csv", ".parquet"):
        yield from _via_datasets(file, suffix[1:])
    elif file.exists() or "/" not in path or path.startswith((".", "/")):
        raise DataError(
            f"{path}: not a .jsonl, .json, .csv or .parquet file, nor a hub dataset name (owner/name); "
            "fix data.sources[].path"
        )
    else:
        yield from _hub(path, hub_split)


def _jsonl(file: Path):
    with file.open("rb") as fh:
        head = fh.read(3)
    if head == BOM:
        raise DataError(
            f"{file}:1: the file starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM "
            f"(for example: sed -i '1s/^\\xEF\\xBB\\xBF//' {file})"
        )
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{file}:{number}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = BadRow(f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
            if not isinstance(row, (dict, BadRow)):
                row = BadRow(f"{file}:{number}: expected a JSON object per line, got {type(row).__name__}")
            yield f"{file}:{number}", row


def _json(file: Path):
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}); a .json file holds one array of objects") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: a .json data file must hold an array of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            row = BadRow(f"{file}: row {index}: expected an object, got {type(row).__name__}")
        yield f"{file}: row {index}", row


def _via_datasets(file: Path, kind: str):
    from datasets import load_dataset

    try:
        table = load_dataset(kind, data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        cause = _root_cause(exc)
        if "corresponds to no data" in cause:
            raise DataError(f"{file}: no rows under its header; point data.sources[].path at a file with rows") from None
        line = re.search(r"in line (\d+)", cause) if kind == "csv" else None
        if line is not None:
            raise DataError(f"{file}:{line.group(1)}: {cause.split('error: ')[-1].strip()}; a field that holds a comma "
                            'must be quoted ("like, this")') from None
        raise DataError(f"{file}: cannot be read as {kind}: {cause}") from None
    if kind == "csv" and "__index_level_0__" in table.column_names:
        header = [name for name in table.column_names if name != "__index_level_0__"]
        raise DataError(f"{file}:2: more fields than the header names ({', '.join(header)}), so every column would "
                        'shift by one; a field that holds a comma must be quoted ("like, this")')
    for index, row in enumerate(table):
        where = f"{file}:{index + 2}" if kind == "csv" else f"{file}: row {index}"
        yield where, _decode_nested(row)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message: datasets wraps the parser's own, which names the line."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc)


def _hub(name: str, split: str):
    from datasets import load_dataset

    try:
        table = load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(f"{name}: cannot load this hub dataset ({type(exc).__name__}: {exc}); offline runs need a local file") from None
    for index, row in enumerate(table):
        yield f"{name}: row {index}", row


def _decode_nested(row: dict) -> dict:
    """CSV cells holding JSON lists (a messages column, say) become lists."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out
