"""Checkpoints that are complete or absent: written aside, marked, renamed into place, rotated.

A checkpoint is `checkpoints/checkpoint-N/` holding a COMPLETE marker (JSON: step, config and data
fingerprints). Anything else in `checkpoints/` (a `.staging-*` folder left by a crash, a folder without
the marker) is never resumed from.
"""

import json
import os
import shutil
from pathlib import Path

MARKER = "COMPLETE"
PREFIX = "checkpoint-"
STAGING = ".staging-"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted((p for p in found if (p / MARKER).is_file()), key=step_of)


def latest_complete(folder: Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def read_marker(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / MARKER).read_text(encoding="utf-8"))


def publish(staged: Path, final: Path, info: dict) -> Path:
    """Mark a fully written checkpoint complete and move it into place in one rename."""
    marker = staged / MARKER
    with marker.open("w", encoding="utf-8") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    return final


def rotate(folder: Path, keep_last: int, keep: set[Path]) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last, sparing those in keep; returns the deleted."""
    found = complete_checkpoints(folder)
    doomed = [p for p in found[: max(len(found) - keep_last, 0)] if p.resolve() not in {k.resolve() for k in keep}]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
