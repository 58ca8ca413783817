"""Checkpoints that are complete or absent: written aside, marked, renamed into place, rotated.

A checkpoint is `checkpoints/checkpoint-N/` holding a COMPLETE marker (JSON: step, config and data
fingerprints, the size of every file written). Anything else in `checkpoints/` (a `.staging-*` folder left by
a crash, a folder without the marker) is never resumed from.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from loraforge.rundir import CHECKPOINT as PREFIX, COMPLETE as MARKER, complete_checkpoints, newest_usable

log = logging.getLogger("loraforge.train")

FLOAT_BYTES = 4
# Per trainable parameter a checkpoint holds its weight and AdamW's two moments; logs, plots and reports are small.
CHECKPOINT_COPIES = 3
SMALL_FILES_BYTES = 20 * 2**20


def bytes_to_write(train_config, trainable: int) -> int:
    """Most disk a run takes at once: the checkpoints it keeps (the best, keep_last, and the one being written
    before the oldest is rotated out), the final weights, and its small files."""
    checkpoint = trainable * FLOAT_BYTES * CHECKPOINT_COPIES
    kept = train_config.keep_last + 2 if train_config.save_every else 1
    return kept * checkpoint + trainable * FLOAT_BYTES + SMALL_FILES_BYTES




def latest_complete(folder: Path) -> Path | None:
    """The newest checkpoint that can be resumed from; newer marked ones that cannot are skipped, with a warning."""
    return newest_usable(folder, lambda checkpoint, reason: log.warning("skipping %s for an earlier checkpoint: %s",
                                                                          checkpoint, reason))


def read_marker(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / MARKER).read_text(encoding="utf-8"))


def publish(staged: Path, final: Path, info: dict) -> Path:
    """Mark a fully written checkpoint complete and move it into place in one rename."""
    marker = staged / MARKER
    sizes = {str(p.relative_to(staged)): p.stat().st_size for p in staged.rglob("*") if p.is_file()}
    with marker.open("w", encoding="utf-8") as fh:
        json.dump({**info, "sizes": sizes}, fh)
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
