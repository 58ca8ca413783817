"""The run directory: what a run writes, where, and how later commands read it back."""

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open

from loraforge.config import RunConfig, load_config
from loraforge.errors import ConfigError, RunDirError
from loraforge.model.sources import model_location, resolve_model

RESOLVED = "resolved.yaml"
ADAPTER = "adapter"
# Under adapter/: the reference adapter of a preference run (TRL names it so).
REFERENCE = "ref"
MODEL = "model"
MERGED = "merged"
EXPORT = "export"
REPORT = "report.md"
LABELS = "labels.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
LOG = "train.log"
EVAL = "eval.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TENSORBOARD = "tensorboard"
# Under tensorboard/: the event files of each session.
EVENTS = "events.out.tfevents."
# Under checkpoints/: the folder a checkpoint is written into before it is complete.
STAGING = ".staging-"
# Under checkpoints/: a checkpoint's folder, its step after the prefix.
CHECKPOINT = "checkpoint-"
# In a checkpoint's folder: the marker written once the checkpoint is whole (training/checkpoints.py).
COMPLETE = "COMPLETE"
# What resuming reads besides the weights: without them the run would go on with a fresh optimizer or schedule.
NEEDED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# Written first into every run directory loraforge creates: what holds it is loraforge's to write.
CLAIM = ".loraforge-run"
# manifest.json while it is written, before it takes the name.
MANIFEST_STAGED = f".{MANIFEST}.tmp"
# All a run writes before its first checkpoint (manifest.json: where it runs from, completed at its end).
BEFORE_CHECKPOINTS = (CLAIM, RESOLVED, MANIFEST, MANIFEST_STAGED, LOG, METRICS, TENSORBOARD, CHECKPOINTS)

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not one (the last, torn when a run was killed while writing
    it) is left out with a warning, so resume, plots and summaries go on with the rest."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
            log.warning("%s:%d: not a whole record (a run stopped while writing it?); left out", path, number)
        if isinstance(record, dict):
            records.append(record)
    return records


def ensure_free(output_dir: str | Path) -> Path:
    """Refuse a directory that already holds a run, or files loraforge did not write, so nothing is overwritten. A run
    that stopped before its first checkpoint left nothing to go on from: a new start takes its directory over
    (`start_over`), unless that run is still going."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {run_dir} is a file; set output_dir to a directory path")
    if stopped_before_checkpoint(run_dir):
        refuse_in_use(run_dir)
        return run_dir
    if (run_dir / RESOLVED).exists() or (run_dir / CLAIM).exists():
        carry_on = (" To carry it on from its newest checkpoint, add --resume auto." if _newest_checkpoint(run_dir)
                    else "")
        marker = RESOLVED if (run_dir / RESOLVED).exists() else CLAIM
        raise RunDirError(
            f"{run_dir} already holds a run ({marker} is there); set output_dir to a new directory "
            f"(for example output_dir={run_dir}-2) or delete the old one.{carry_on}"
        )
    refuse_foreign(run_dir, "output_dir")
    return run_dir


def open_as_umask(folder: Path) -> None:
    """Files under folder that a library wrote owner-only (safetensors' weights go through a temporary file, made
    0600) get the mode this process's umask gives any new file, as every other file of the run has."""
    umask = os.umask(0o077)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600:
                path.chmod(0o666 & ~umask)
        except OSError:  # a file system that keeps its own modes (vfat, some network mounts): the file stays as is
            continue


def stopped_before_checkpoint(run_dir: str | Path) -> bool:
    """Whether run_dir holds a run that stopped before its first checkpoint, and nothing else: loraforge's claim and
    the files a run writes until then, with at most a checkpoint cut short in checkpoints/ (its staging folder).
    resolved.yaml may be missing: the run stopped before writing it, or `start_over` was stopped before its end.
    Each is what loraforge writes there, a file or a folder, and not a link: start_over removes what they hold."""
    run_dir = Path(run_dir)
    if not _is(run_dir / CLAIM, folder=False):
        return False
    return (all(p.name in BEFORE_CHECKPOINTS and _is(p, folder=p.name in (CHECKPOINTS, TENSORBOARD))
                for p in run_dir.iterdir())
            and _holds_only(run_dir / CHECKPOINTS, STAGING, folders=True)
            and _holds_only(run_dir / TENSORBOARD, EVENTS, folders=False))


def _is(path: Path, folder: bool) -> bool:
    """path is a folder (or a file), itself rather than a link to one."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)


def _holds_only(folder: Path, prefix: str, folders: bool) -> bool:
    return not folder.exists() or all(p.name.startswith(prefix) and _is(p, folders) for p in folder.iterdir())


def start_over(run_dir: Path) -> None:
    """A new run in a directory whose run stopped before its first checkpoint (`ensure_free` let it through; the
    caller holds it, `in_use`): that run's files go, but its train.log, which the new run carries on below a line
    saying so. resolved.yaml goes last: a start over stopped midway leaves a run that stopped, which the next start
    starts over in."""
    if not stopped_before_checkpoint(run_dir) or all(p.name == CLAIM for p in run_dir.iterdir()):
        return
    log.warning("%s: its run stopped before its first checkpoint; this run starts over in it (%s carried on, the "
                "rest of that run's files replaced)", run_dir, LOG)
    (run_dir / METRICS).unlink(missing_ok=True)
    (run_dir / MANIFEST).unlink(missing_ok=True)
    (run_dir / MANIFEST_STAGED).unlink(missing_ok=True)
    shutil.rmtree(run_dir / TENSORBOARD, ignore_errors=True)
    for staged in (run_dir / CHECKPOINTS).glob(f"{STAGING}*"):
        shutil.rmtree(staged, ignore_errors=True)
    if (run_dir / LOG).is_file():
        written = (run_dir / LOG).read_bytes()
        with (run_dir / LOG).open("a", encoding="utf-8") as fh:
            # The run may have been killed in the middle of a line.
            fh.write(("\n" if written and not written.endswith(b"\n") else "") + "---- the run above stopped before "
                     "its first checkpoint; a new run starts over in this directory ----\n")
    (run_dir / RESOLVED).unlink(missing_ok=True)


def refuse_linked_files(run_dir: Path) -> None:
    """A run directory that a resume writes into again holds no link in place of a file: its log and metrics are
    appended to, the rest rewritten, and through a link that lands in a file loraforge did not write. A link to a
    folder (checkpoints kept on another disk) is followed. (A start over refuses any link: `ensure_free`.)"""
    linked = sorted(p.name for p in run_dir.iterdir() if p.is_symlink() and not p.is_dir())
    if linked:
        raise RunDirError(f"{run_dir} holds links in place of the files loraforge writes there ({', '.join(linked[:5])}); "
                          "carrying on the run would write through them into the files they point to: put a copy of "
                          "each file in place of its link (cp --remove-destination \"$(readlink -f LINK)\" LINK), or "
                          "remove the link")


def refuse_foreign(folder: Path, key: str, ours: str = CLAIM) -> None:
    """Refuse a non-empty folder that loraforge did not make (it holds no `ours` file)."""
    if folder.is_dir() and not (folder / ours).exists() and any(folder.iterdir()):
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
        raise RunDirError(f"{key} {folder} already holds files loraforge did not write ({shown}); choose an empty "
                          "or new directory: loraforge never overwrites or adds to files it did not write")


def check_space(output_dir: str | Path, needed: int) -> None:
    """Refuse a run whose files would not fit on the disk of output_dir, before it starts, not at its last save."""
    existing = Path(output_dir).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise RunDirError(f"output_dir {output_dir}: {free / 2**20:,.0f} MB free on its disk, and this run writes up "
                          f"to {needed / 2**20:,.0f} MB (checkpoints, weights, logs); free space, lower "
                          "train.keep_last, or choose a directory on another disk")


def create(output_dir: str | Path) -> Path:
    """The run directory, claimed: the claim is created, never written through a link or into a file already there;
    one already there as a file is the claim of the run `ensure_free` lets this one start over from, and is kept."""
    run_dir = ensure_free(output_dir)
    claim = run_dir / CLAIM
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            if not _is(claim, folder=False):
                raise _not_a_claim(claim, run_dir) from None
            return run_dir
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("A run directory written by loraforge.\n")
    except OSError as exc:
        raise RunDirError(f"output_dir {run_dir} cannot be written ({exc.strerror}: {exc.filename}); choose a "
                          "directory you can write to") from None
    return run_dir


def refuse_in_use(run_dir: Path) -> None:
    """Refuse a run directory another loraforge process trains in: one still loading looks like one that stopped."""
    if os.path.lexists(Path(run_dir) / CLAIM):
        with in_use(Path(run_dir)):
            pass


@contextmanager
def in_use(run_dir: Path):
    """This process trains in run_dir: a second train or resume of it is refused while this one lasts. The lock is
    the kernel's (flock on the claim file), so it goes with the process however it ends. The claim is created where
    it is missing, never opened through a link (what another name stands for is not loraforge's) and never written
    to; it is opened for writing all the same, which NFS asks of a file to lock it exclusively."""
    claim = run_dir / CLAIM
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(claim, os.O_RDWR | flags, 0o644)
        except PermissionError:
            fd = os.open(claim, os.O_RDONLY | flags, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise RunDirError(f"output_dir {run_dir} cannot be written ({exc.strerror}: {claim}); choose a "
                              "directory you can write to") from None
        fd = None
    try:
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a_claim(claim, run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            checkpoint = _newest_checkpoint(run_dir)
            when = "if it does not complete" if checkpoint else "if it stops before its first checkpoint"
            raise RunDirError(f"{run_dir} is in use: another loraforge process is training in it; wait for it to end "
                              f"(or stop it), then, {when}, {_carry_on(run_dir, checkpoint)}") from None
        except OSError as exc:
            raise RunDirError(f"{claim} cannot be locked ({exc.strerror}), so this process cannot keep others from "
                              f"training in {run_dir}; choose an output_dir on a file system that supports locks "
                              "(flock)") from None
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _not_a_claim(claim: Path, run_dir: Path) -> RunDirError:
    kind = "a link" if claim.is_symlink() else "a folder" if claim.is_dir() else "not a plain file"
    return RunDirError(f"{claim} is {kind}, not the file loraforge writes to claim {run_dir}; move it out of "
                       f"{run_dir} and run again: loraforge writes its own there, and never writes to or locks a file "
                       "it did not write")


def _newest_checkpoint(run_dir: Path) -> str | None:
    """The name of the newest checkpoint of run_dir that --resume auto would take."""
    found = newest_usable(run_dir / CHECKPOINTS)
    return found.name if found else None


def newest_usable(folder: Path, skipped: Callable[[Path, str], None] = lambda checkpoint, reason: None) -> Path | None:
    """The newest complete checkpoint in folder that can be resumed from; skipped(checkpoint, why) hears of each newer
    marked one that cannot."""
    for checkpoint in reversed(complete_checkpoints(folder)):
        reason = unusable(checkpoint)
        if reason is None:
            return checkpoint
        skipped(checkpoint, reason)
    return None


def step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT) :])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT) and p.name[len(CHECKPOINT) :].isdigit()]
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=step_of)


def unusable(checkpoint: Path) -> str | None:
    """Why a marked checkpoint cannot be resumed from (an unreadable marker, a file missing), or None."""
    checkpoint = Path(checkpoint)
    try:
        marker = json.loads((checkpoint / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return f"its marker {checkpoint / COMPLETE} is not the JSON loraforge writes"
    missing = [name for name in NEEDED if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    if missing:
        return f"{', '.join(missing)} missing"
    sizes = marker.get("sizes") if isinstance(marker.get("sizes"), dict) else {}
    changed = [f"{name} is {(checkpoint / name).stat().st_size if (checkpoint / name).is_file() else 'no'} bytes, "
               f"{size} when written" for name, size in sorted(sizes.items())
               if not (checkpoint / name).is_file() or (checkpoint / name).stat().st_size != size]
    return f"{'; '.join(changed[:3])} (cut short or changed since)" if changed else None


def how_to_go_on(run_dir: Path, checkpoint: str | Path | None) -> Literal["resume", "start over", "elsewhere"]:
    """How a run that did not complete goes on: "resume" from its newest complete checkpoint (the caller's find) with
    --resume auto; with none, "start over" by the command without it where it left no more than a run writes before
    its first checkpoint (--resume auto refuses that run), else "elsewhere", in another output_dir."""
    if checkpoint is not None:
        return "resume"
    if stopped_before_checkpoint(run_dir):
        return "start over"
    return "elsewhere"


def _carry_on(run_dir: Path, checkpoint: str | None) -> str:
    way = how_to_go_on(run_dir, checkpoint)
    if way == "resume":
        return f"carry it on to its end with `loraforge train CONFIG output_dir={run_dir} --resume auto`"
    if way == "start over":
        return f"start it over with `loraforge train CONFIG output_dir={run_dir}`, without --resume"
    return (f"start it again with another output_dir (no checkpoint holds it to carry on from, and {run_dir} holds "
            "more than a run writes before its first checkpoint)")


def read_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not (run_dir / RESOLVED).is_file():
        why = ("it does not exist" if not run_dir.exists() else "it is a file" if not run_dir.is_dir()
               else f"{RESOLVED} is missing")
        raise RunDirError(f"{run_dir} is not a run directory: {why}; pass the output_dir of a training run")
    if not (run_dir / ADAPTER / "adapter_config.json").is_file() and not (run_dir / MODEL / "config.json").is_file():
        checkpoint = _newest_checkpoint(run_dir)
        finished = read_manifest(run_dir).get("steps")
        if isinstance(finished, int):
            held = f"{CHECKPOINTS}/{checkpoint}" if checkpoint else "a checkpoint under checkpoints/"
            raise RunDirError(f"{run_dir} finished at step {finished}, but neither {ADAPTER}/adapter_config.json nor "
                              f"{MODEL}/config.json is there: files were removed from it since; copy the run again (or "
                              f"take the weights {held} holds, which may be from an earlier step than the last)")
        state = (f"it stopped at or after {checkpoint}: {_carry_on(run_dir, checkpoint)}" if checkpoint else
                 f"it is still training, or stopped before its first checkpoint (train.save_every); if it stopped, "
                 f"{_carry_on(run_dir, None)}")
        raise RunDirError(
            f"{run_dir} has no finished adapter ({ADAPTER}/adapter_config.json) or model ({MODEL}/config.json): "
            f"the run did not complete; {state}"
        )
    return load_config(run_dir / RESOLVED)


# The keys of manifest.json that later commands read, and the types they hold.
MANIFEST_READ = {"cwd": str, "data_files": dict, "precision": dict, "steps": int}


def read_manifest(run_dir: str | Path) -> dict:
    """A run's manifest.json (its cwd, data_files and precision alone where the run has not completed it); empty
    where there is none. One that cannot be read, and a key that later commands read holding another type (a
    hand-edited file), are left out with a warning naming them and what the command does without them."""
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _warn_once(f"{path} cannot be read ({getattr(exc, 'strerror', None) or exc}): taken as absent, so the run is "
                   "computed in fp32 and its data files are not checked against the ones it trained on; copy the run "
                   "again to have it back")
        return {}
    if not isinstance(manifest, dict):
        _warn_once(f"{path} holds a JSON {type(manifest).__name__}, not an object: taken as absent (the run is "
                   "computed in fp32 and its data files are not checked); copy the run again to have it back")
        return {}
    wrong = [key for key, kind in MANIFEST_READ.items() if key in manifest and not isinstance(manifest[key], kind)]
    if wrong:
        one = len(wrong) == 1
        _warn_once(f"{path}: {', '.join(wrong)} {'is' if one else 'are'} not of the type loraforge wrote, so left out; "
                   f"copy the run again to have {'it' if one else 'them'} back")
    return {key: value for key, value in manifest.items() if key not in wrong}


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def base_location(run_dir: str | Path, config: RunConfig) -> str:
    """What the model.name of a run loads from any folder (model_location): a relative folder from the one the run
    trained in (manifest.json's cwd; the current one where no manifest says or that folder is gone)."""
    return model_location(config.model.name, read_manifest(run_dir).get("cwd"))


def base_model(run_dir: str | Path, config: RunConfig) -> str:
    """What from_pretrained loads a run's base from (model/sources.py's resolve_model of base_location, at the run's
    model.revision): a built-in model converted where it is not yet, a hub id refused at once where it cannot be had."""
    return resolve_model(base_location(run_dir, config), config.model.revision)


def trained_precision(run_dir: str | Path) -> str | None:
    """The precision a run trained in (manifest.json's chosen one: fp32, bf16 or fp16); None without a readable
    manifest."""
    precision = read_manifest(run_dir).get("precision")
    chosen = precision.get("chosen") if isinstance(precision, dict) else None
    return chosen if chosen in ("fp32", "bf16", "fp16") else None


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(folder: Path) -> None:
    """An adapter folder that PEFT can load: its config and its weights, else one message naming what is missing."""
    missing = [name for name, present in (("adapter_config.json", (folder / "adapter_config.json").is_file()),
                                          (" or ".join(ADAPTER_WEIGHTS), any((folder / w).is_file() for w in ADAPTER_WEIGHTS)))
               if not present]
    if missing:
        raise RunDirError(f"{folder} lacks {' and '.join(missing)}, so the adapter cannot be loaded; copy the run "
                          "again or train it again (a checkpoint under checkpoints/ holds the same files)")
    path = folder / "adapter_config.json"
    try:
        adapter_config = json.loads(path.read_text(encoding="utf-8"))
        problem = None if isinstance(adapter_config, dict) and isinstance(adapter_config.get("peft_type"), str) else (
            "it names no peft_type")
    except (OSError, ValueError) as exc:
        problem = f"{getattr(exc, 'strerror', None) or exc}"
    if problem:
        raise RunDirError(f"{path} cannot be read ({problem}): the file is damaged or cut short; copy the run again, "
                          "or take the adapter from the checkpoint it came from (checkpoints/)")
    check_weights_readable(folder)


def check_weights_readable(folder: Path) -> None:
    """The adapter's safetensors file whole (a copy cut short fails here, not in a traceback deep inside PEFT)."""
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="numpy") as weights:
            weights.keys()
    except (SafetensorError, OSError) as exc:
        raise RunDirError(f"{path} cannot be read ({exc}): the file is damaged or cut short; copy the run again, or "
                          "take the adapter from the checkpoint it came from (checkpoints/)") from None


def check_init_from(config: RunConfig) -> None:
    """The run init_from names holds a LoRA adapter that this config can carry on training: trained on the same
    model (one local folder however each names it), layers, quantization, task and LoRA settings (its dropout aside).
    Read from its resolved.yaml, manifest.json and adapter files alone, so a mismatch is said before any data is
    prepared or model loaded."""
    if config.init_from is None:
        return
    source = Path(config.init_from)
    try:
        earlier = read_config(source)
        if earlier.adapter != "lora" or not (source / ADAPTER / "adapter_config.json").is_file():
            raise ConfigError([f"init_from: {source} holds no LoRA adapter ({ADAPTER}/); start from a run with "
                               "adapter: lora"])
        check_adapter(source / ADAPTER)
    except RunDirError as exc:
        raise ConfigError([f"init_from: {exc}"]) from None
    mismatched = [f"{name} {a!r} there, {b!r} here" for name, a, b in (
        ("model.name", base_location(source, earlier), model_location(config.model.name)),
        ("model.variant", earlier.model.variant, config.model.variant),
        ("model.drop_layers", earlier.model.drop_layers, config.model.drop_layers),
        ("model.keep_layers", earlier.model.keep_layers, config.model.keep_layers),
        ("quantization.mode", earlier.quantization.mode, config.quantization.mode),
        ("task", earlier.task, config.task)) if a != b]
    ours, theirs = config.lora.model_dump(exclude={"dropout"}), earlier.lora.model_dump(exclude={"dropout"})
    mismatched += [f"lora.{key} {theirs[key]!r} there, {ours[key]!r} here" for key in ours if ours[key] != theirs[key]]
    if mismatched:
        raise ConfigError([f"init_from: {source} was trained on another setup ({'; '.join(mismatched)}); use the "
                           "same model and lora settings as that run"])
