"""Where outputs go: output_dir's {model}, {data} and {time}, filled in once when a run starts, and a file standing where
a folder of an output path would have to be made."""

import re
from datetime import datetime
from pathlib import Path

from loraforge.config.schema import RunConfig


def expand_output_dir(config: RunConfig, now: datetime | None = None, reserve: bool = False) -> RunConfig:
    """The config with {model}, {data} and {time} of output_dir filled in; where {time} names a directory that is
    already there (another run started in the same second), -2, -3, ... is added to it. reserve: make the directory
    {time} names, empty, so that runs started together each get their own (`remove_if_unused` after a run that
    stopped before writing to it)."""
    if "{" not in config.output_dir:
        return config
    source = config.data.sources[0].path
    values = {"model": _slug(Path(config.model.name.rstrip("/")).name),
              "data": _slug(Path(source).stem if Path(source).suffix else Path(source).name),
              "time": (now or datetime.now()).strftime("%Y%m%d-%H%M%S")}
    expanded = config.output_dir.format(**values)
    if "{time}" in config.output_dir:
        names = (expanded, *(f"{expanded}-{n}" for n in range(2, 10_000)))
        expanded = next(name for name in names if not Path(name).exists() and (not reserve or _made(Path(name))))
    return config.model_copy(update={"output_dir": expanded})


def _made(folder: Path) -> bool:
    """Whether this process made folder now (False: it is there already, made by another); True where it cannot be
    made, for the run to say why when it writes there."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def remove_if_unused(folder: str | Path) -> None:
    """A directory `expand_output_dir` reserved, removed where the run stopped before writing anything to it."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "x"


def file_in_the_way(path: Path) -> Path | None:
    """The file standing where a folder above path would have to be, or None."""
    return next((above for above in Path(path).parents if above.exists() and not above.is_dir()), None)
