"""Rows out of a source, each with where it came from: JSONL/JSON (an array, or JSON lines) by hand and CSV through
the csv module (for line numbers, and every CSV cell as the text it is), Parquet and hub datasets through `datasets`."""

import csv
import difflib
import io
import json
import logging
import re
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

from loraforge.config.load import kind_of
from loraforge.errors import DataError
from loraforge.model.sources import UNREACHABLE, hub_problem, hub_snapshot, in_hub_cache

log = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"
# The csv module refuses a cell over 128 KiB; a long document in one cell is valid CSV.
CSV_CELL_LIMIT = 1 << 30
UNDECODED = re.compile("[\udc80-\udcff]")


class BadRow(DataError):
    """A row that cannot be parsed; skipped with data.on_bad_row=skip."""


FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
KINDS = ".jsonl, .json, .csv or .parquet"
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Data file types loraforge does not read, named as files and not as hub datasets (someone/wiki.en is one).
OTHER_FILE_SUFFIXES = (".txt", ".tsv", ".ndjson", ".jsonlines", ".xlsx", ".xls", ".arrow", ".pq", ".gz", ".zip",
                       ".tar", ".yaml", ".yml", ".md", ".xml", ".html")


def source_problems(sources) -> list[str]:
    """One line per data.sources entry naming a local file that is not there or not of a type loraforge reads (hub
    datasets are not checked)."""
    return [f"data.sources[{i}].path: {problem}" for i, source in enumerate(sources)
            if (problem := local_problem(source.path)) is not None]


def is_hub_name(path: str) -> bool:
    """owner/name, and nothing that looks local: no ./, ../, / or ~ at the start, no data file's extension (.jsonl,
    .txt, or a typo of one loraforge reads, .jsnol), no first part that is a folder here."""
    return (HUB_NAME.fullmatch(path) is not None and not _file_suffix(Path(path).suffix.lower())
            and not Path(path.split("/")[0]).is_dir())


def _file_suffix(suffix: str) -> bool:
    """A data file's extension, or a typo of one loraforge reads of three letters or more (.jsnol, .cvs; two, as
    .sv or .cs, are as likely a hub name's language code)."""
    return suffix in FILE_SUFFIXES + OTHER_FILE_SUFFIXES or (
        len(suffix) > 3 and bool(difflib.get_close_matches(suffix, FILE_SUFFIXES, n=1, cutoff=0.7)))


def local_problem(path: str) -> str | None:
    """What keeps a local data path from being read (missing, a folder, a type loraforge does not read); None for a
    readable file or a hub dataset name."""
    if is_hub_name(path):
        return None
    file = Path(path)
    suffix = file.suffix.lower()
    if file.is_dir():
        return f"{path}: a folder, not a data file; point at a {KINDS} file"
    if file.exists() and not file.is_file():
        return f"{path}: {kind_of(file)}, not a data file; point at a {KINDS} file"
    if not file.is_file():
        other = "" if suffix in FILE_SUFFIXES else (
            f", and {f'{suffix} is' if suffix else 'a name without an extension is'} not a type loraforge reads ({KINDS})")
        return f"{path}: data file not found (cwd is {Path.cwd()}){other}"
    if suffix not in FILE_SUFFIXES:
        return f"{path}: not a {KINDS} file, nor a hub dataset name (owner/name)"
    return None


def read_rows(path: str, hub_split: str = "train"):
    """Yield (where, row) pairs; `where` is "file:line" for JSONL/CSV, "file: row N" otherwise.

    A row that is not a JSON object comes as a BadRow value (not raised), so that reading can go on
    past it when bad rows are skipped; problems with the whole file are raised as DataError.
    """
    if is_hub_name(path):
        yield from _hub(path, hub_split)
        return
    problem = local_problem(path)
    if problem is not None:
        raise DataError(f"{problem}; fix data.sources[].path")
    file = Path(path)
    if file.stat().st_size == 0:
        raise DataError(f"{file}: the file is empty; point data.sources[].path at a file with rows")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(file)
    elif suffix == ".json":
        yield from _json(file)
    elif suffix == ".csv":
        yield from _csv(file)
    else:
        yield from _parquet(file)


def _jsonl(file: Path):
    with file.open("rb") as fh:
        head = fh.read(3)
    if head == BOM:
        raise DataError(
            f"{file}:1: the file starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM "
            f"(for example: sed -i '1s/^\\xEF\\xBB\\xBF//' {file})"
        )
    with file.open("rb") as fh:
        yield from _lines(file, fh)


def _lines(file: Path, lines):
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            yield f"{file}:{number}", _jsonl_row(raw, file, number)


def _jsonl_row(raw: bytes, file: Path, number: int) -> dict | BadRow:
    where = f"{file}:{number}"
    raw = raw.rstrip(b"\r\n")
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return BadRow(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line); re-save the "
                      "file as UTF-8")
    except json.JSONDecodeError as exc:
        opened = exc.doc.strip()
        if opened in ("{", "["):
            held, rewrite = (("an object", f"jq -c . {file}") if opened == "{" else
                             ("an array", f"jq -c '.[]' {file}, or name the file .json"))
            return BadRow(f"{where}: the line holds only '{opened}': {held} written over several lines (pretty-printed "
                          f"JSON), and JSON lines holds one object per line; rewrite the file so ({rewrite})")
        if not exc.doc[exc.pos:].strip():
            return BadRow(f"{where}: not valid JSON: the line ends at column {len(exc.doc.rstrip())} before its JSON does "
                          f"({exc.msg}): a row cut short, or a line break inside a value (write it as \\n); fix or "
                          "remove the line")
        return BadRow(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line")
    except RecursionError:
        return BadRow(f"{where}: JSON nested deeper than the reader allows; flatten or remove the line")
    if not isinstance(row, dict):
        return BadRow(f"{where}: expected a JSON object per line, got {type(row).__name__}")
    return row


def _json(file: Path):
    """An array of objects, or, as the datasets library reads a .json that does not open with [, JSON lines."""
    raw = file.read_bytes().removeprefix(BOM)
    if not raw.lstrip().startswith(b"["):
        yield from _json_lines(file, raw)
        return
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({exc.reason}); re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg}); a .json file that opens with [ holds "
                        "one array of objects") from None
    except RecursionError:
        raise DataError(f"{file}: JSON nested deeper than the reader allows; flatten the deep value") from None
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            row = BadRow(f"{file}: row {index}: expected an object, got {type(row).__name__}")
        yield f"{file}: row {index}", row


def _json_lines(file: Path, raw: bytes):
    """A .json file of one object per line, each named by its line. A file that is one object, on one line or
    several, is refused as a whole: json.dump writes {"train": [...]} on one line, and a bad row per line would
    hide that it is the layout that is wrong."""
    try:
        whole = json.loads(raw)
    except (ValueError, RecursionError):
        whole = None
    if isinstance(whole, dict):
        lists = [repr(key) for key, value in whole.items()
                 if isinstance(value, list) and value and all(isinstance(item, dict) for item in value)]
        under = f"if the rows are the list under {' or '.join(lists)}, make that list the whole file; " if lists else ""
        raise DataError(f"{file}: one JSON object (keys: {', '.join(whole) or 'none'}), not rows; a .json data file "
                        f"holds an array of objects ([{{...}}, {{...}}]) or one object per line (JSON lines): {under}"
                        "if the object is one row, put it in [ ]")
    yield from _lines(file, io.BytesIO(raw))


def _csv(file: Path):
    """Each row as {header name: cell text}: "4", "01", "NA" and a JSON-looking cell stay the text the file holds
    (the formats decode a JSON list where they want one); a row is named by the line it starts on."""
    rows = 0
    csv.field_size_limit(max(csv.field_size_limit(), CSV_CELL_LIMIT))
    try:
        with file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            reader = csv.reader(fh, strict=True)
            line = 1
            header = next(reader, None)
            if not header:
                raise DataError(f"{file}:1: no header line naming the columns")
            if _undecoded(header) is not None:
                raise DataError(f"{file}:1: the header is not UTF-8 text; re-save the file as UTF-8")
            for name in header:
                if header.count(name) > 1:
                    raise DataError(f"{file}:1: column {name!r} is named twice in the header; rename one")
            line = reader.line_num + 1
            for cells in reader:
                where, line = f"{file}:{line}", reader.line_num + 1
                if not cells:
                    continue
                rows += 1
                undecoded = _undecoded(cells)
                if undecoded is not None:
                    column = repr(header[undecoded]) if undecoded < len(header) else undecoded + 1
                    yield where, BadRow(f"{where}: not UTF-8 text (column {column}); re-save the file as UTF-8")
                elif len(cells) != len(header):
                    yield where, BadRow(f"{where}: {len(cells)} fields where the header names {len(header)} "
                                        f"({', '.join(header)}); a field that holds a comma must be quoted "
                                        '("like, this")')
                else:
                    yield where, dict(zip(header, cells))
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":
            raise DataError(f"{file}:{line}: a quote opened in the row on this line is never closed, so the rest of the "
                            'file would be one field; close it, or double a quote inside a field ("say ""hi""")') from None
        raise DataError(f"{file}:{line}: not valid CSV ({exc}); a field that holds a quote or a line break "
                        'must be quoted, with quotes inside doubled ("say ""hi""")') from None
    if rows == 0:
        raise DataError(f"{file}: no rows under its header; point data.sources[].path at a file with rows")


def _undecoded(cells: list[str]) -> int | None:
    """The first cell holding bytes that were not UTF-8 (read with surrogateescape, they are lone surrogates)."""
    return next((index for index, cell in enumerate(cells) if UNDECODED.search(cell)), None)


def _parquet(file: Path):
    import pyarrow.parquet
    from datasets import load_dataset

    try:
        empty = pyarrow.parquet.ParquetFile(file).metadata.num_rows == 0
    except Exception:  # an unreadable file: load_dataset below says what is wrong with it
        empty = False
    if empty:
        raise DataError(f"{file}: no rows (its columns are there, its rows are not); point data.sources[].path at a "
                        "file with rows")
    try:
        table = load_dataset("parquet", data_files=str(file), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{file}: cannot be read as parquet: {_root_cause(exc)}") from None
    for index, row in enumerate(table):
        yield f"{file}: row {index}", row


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message: datasets wraps the reader's own."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc)


def _hub(name: str, split: str):
    import datasets.config
    from datasets import load_dataset

    cached = in_hub_cache(name, repo_type="dataset") or _in_datasets_cache(name)
    problem = None if cached and datasets.config.HF_HUB_OFFLINE else hub_problem(name, "README.md", repo_type="dataset")
    if problem is not None and not cached:
        raise DataError(f"{name}: hub dataset {problem}; point data.sources[].path at a local file, or run once "
                        "online to cache it")
    unreachable = problem is not None and UNREACHABLE in problem
    if unreachable:
        log.info("%s: the hub cannot be reached; loading it from the local cache", name)
    source = name
    if (unreachable or datasets.config.HF_HUB_OFFLINE) and not _in_datasets_cache(name):
        # Offline, datasets loads only rows it prepared itself; files fetched into the hub cache by other means
        # (`hf download`, snapshot_download) load as the local folder they are.
        snapshot = hub_snapshot(name, repo_type="dataset")
        source = str(snapshot) if snapshot is not None else name
    try:
        with _offline() if unreachable else nullcontext():
            table = load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(f"{name}: cannot load this hub dataset ({type(exc).__name__}: {exc}); offline runs need a local file") from None
    for index, row in enumerate(table):
        yield f"{name}: row {index}", row


_OFFLINE = threading.RLock()


@contextmanager
def _offline():
    """datasets and huggingface_hub read HF_HUB_OFFLINE once, at import, into the constants they check on each
    call; load_dataset has no parameter for it. Set both for the block, else an unreachable hub is asked five more
    times with back-off (about 25 s) before datasets falls back to its cache. Blocks of several threads run one at a
    time, so each restores what it found and none leaves the process offline."""
    import datasets.config
    import huggingface_hub.constants

    with _OFFLINE:
        held = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = held


def _in_datasets_cache(name: str) -> bool:
    """datasets' own cache holds the rows it prepared from the hub dataset `name`, which it loads offline without
    the hub cache: datasets 5.2 keeps them in HF_DATASETS_CACHE/{namespace}___{name in snake case}/{config}/
    {version}/{hash}/ and, offline, loads any such folder (load.CachedDatasetModuleFactory)."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    namespace, dataset = name.split("/")
    root = Path(config.HF_DATASETS_CACHE).expanduser() / f"{namespace}___{camelcase_to_snakecase(dataset)}"
    return any(folder.is_dir() for folder in root.glob("*/*/*"))


def first_row(path: str) -> dict:
    """The first row of a local data file, read as training reads it; DataError saying why there is none."""
    if Path(path).suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"{path}: not a local .jsonl, .json, .csv or .parquet file (a hub dataset is not read here)")
    for _, row in read_rows(path):
        if isinstance(row, BadRow):
            raise row
        return row
    raise DataError(f"{path}: no rows")
