"""Which files of an output folder loraforge wrote, so that a second merge, export or eval rewrites them and nothing
else.

Each folder keeps a ledger: the sha256 of every file it wrote, and the names being written now. A file that is not in
the ledger, or whose content changed since (a hand-edited Modelfile or chat template), is never overwritten. Names
still marked as being written belong to a merge or export that was stopped midway; the next one redoes them.
"""

import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path

from loraforge.data.cache import file_digest as sha256
from loraforge.config.output_dir import file_in_the_way
from loraforge.errors import ExportError

LEDGER = ".loraforge-files.json"
EVERY_FILE = "*"
# Commands whose files go into the run directory itself (key: the command's name), not into a folder the user names.
IN_THE_RUN = ("export", "eval")


def read(folder: Path) -> dict:
    try:
        ledger = json.loads((folder / LEDGER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"writing": [], "files": {}}
    return ledger if isinstance(ledger, dict) else {"writing": [], "files": {}}


def written(folder: Path, name: str) -> bool:
    """True where loraforge finished writing folder/name and it is unchanged since."""
    ledger = read(Path(folder))
    writing, recorded = ledger.get("writing", []), ledger.get("files", {}).get(name)
    path = Path(folder) / name
    return (recorded is not None and EVERY_FILE not in writing and name not in writing and path.is_file()
            and sha256(path) == recorded)


def intact(folder: Path) -> bool:
    """True where loraforge finished writing the folder and every file it wrote there is present and unchanged."""
    files = read(Path(folder)).get("files", {})
    return bool(files) and all(written(folder, name) for name in files)


def claim(folder: Path, names: list[str] | None, key: str) -> None:
    """Refuse to write `names` into folder (None: a whole new set of files, so every file there) if one of them is a
    file loraforge did not write or one changed since; then mark them as being written."""
    folder = Path(folder)
    check(folder, names, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _alone_in(folder):
            ledger = read(folder)
            _write(folder, sorted(set(ledger.get("writing", [])) | ({EVERY_FILE} if names is None else set(names))),
                   ledger.get("files", {}))
    except OSError as exc:
        raise ExportError(f"{key} {folder} cannot be written to ({exc.strerror or exc}); {_writable_fix(key)}") from None


def check(folder: Path, names: list[str] | None, key: str) -> None:
    """claim's refusal alone, writing nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{key} {folder} is a file; give a folder path")
    _check_writable(folder, key)
    ledger = read(folder)
    writing, files = set(ledger.get("writing", [])), ledger.get("files", {})
    present = [p.name for p in sorted(folder.iterdir()) if not p.name.startswith(LEDGER)] if folder.is_dir() else []
    targets = present if names is None else [name for name in names if name in present]
    others = [name for name in targets if not (folder / name).is_file() or (
        EVERY_FILE not in writing and name not in writing and files.get(name) != sha256(folder / name))]
    if others:
        elsewhere = "" if key in IN_THE_RUN else " or choose another folder"
        raise ExportError(f"{key} {folder} holds files loraforge did not write, or that changed since it wrote them "
                          f"({', '.join(others[:5])}); move them away{elsewhere}: loraforge never "
                          "overwrites a file it did not write")


def _check_writable(folder: Path, key: str) -> None:
    """The folder, or the nearest folder above it that exists (where it would be made), takes new files."""
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise ExportError(f"{key} {folder} cannot be made: {blocking} is a file; give a folder path")
    there = next(above for above in (folder, *folder.parents) if above.exists())
    if not os.access(there, os.W_OK | os.X_OK):
        raise ExportError(f"{key} {folder} cannot be written to ({there} is not writable by this user); "
                          f"{_writable_fix(key)}")


def _writable_fix(key: str) -> str:
    return (f"make the run directory writable, or {key} a writable copy of the run" if key in IN_THE_RUN
            else "give a folder this user can write")


def record(folder: Path, names: list[str] | None) -> None:
    """Mark `names` (None: every file now in folder, and only those) as written, with their content's hash."""
    folder = Path(folder)
    done = [p.name for p in folder.iterdir() if not p.name.startswith(LEDGER) and p.is_file()] if names is None else names
    hashes = {name: sha256(folder / name) for name in done}
    with _alone_in(folder):
        ledger = read(folder)
        files = {} if names is None else dict(ledger.get("files", {}))
        files.update(hashes)
        writing = [] if names is None else [n for n in ledger.get("writing", []) if n not in done]
        _write(folder, writing, files)


@contextlib.contextmanager
def _alone_in(folder: Path):
    """One process at a time reads and rewrites the folder's ledger (two evals of a run ending together each keep
    their entry): an flock on the folder itself, which adds no file to it; unlocked where the file system has no
    flock."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def _write(folder: Path, writing: list[str], files: dict) -> None:
    """The new ledger in full, or the old one: written beside it under a new name, then renamed over it."""
    text = json.dumps({"writing": writing, "files": files}, indent=2, sort_keys=True) + "\n"
    beside = folder / f"{LEDGER}.{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(beside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(beside, folder / LEDGER)
    except BaseException:
        beside.unlink(missing_ok=True)
        raise
