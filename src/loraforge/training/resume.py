"""Resuming a run: which checkpoint, whether it matches the config and data, and tidying the metrics."""

import hashlib
import json
import logging
import shlex
from pathlib import Path

from loraforge import rundir
from loraforge.config import load_config
from loraforge.errors import ConfigError, RunDirError
from loraforge.model.precision import Precision
from loraforge.rundir import complete_checkpoints, step_of, unusable
from loraforge.training.checkpoints import MARKER, latest_complete, read_marker
from loraforge.training.manifest import data_fingerprints

log = logging.getLogger(__name__)
# transformers' TRAINER_STATE_NAME, named here so that the launcher, which imports this module, holds no transformers.
TRAINER_STATE = "trainer_state.json"

# Settings a resume may change freely: where the run is, what it logs and reports, the answers it generates to show,
# and how often it checkpoints; none changes the steps it takes.
IGNORED_ON_RESUME = ("output_dir", "logging", "report_to", "tracking", "eval", "train.save_every", "train.keep_last")


def ignored_on_resume(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in IGNORED_ON_RESUME)


def config_fingerprint(config) -> str:
    data = {key: value for key, value in _flat(config.model_dump(mode="json")).items() if not ignored_on_resume(key)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """`auto`: the newest complete checkpoint of run_dir; otherwise the checkpoint folder given."""
    run_dir = Path(run_dir)
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir():
            raise RunDirError(f"--resume {path}: no such checkpoint folder; use --resume auto for the newest "
                              f"complete checkpoint of {run_dir}")
        name = path.resolve().name
        if not (name.startswith(rundir.CHECKPOINT) and name[len(rundir.CHECKPOINT):].isdigit()):
            held = [c.name for c in complete_checkpoints(path) or complete_checkpoints(path / rundir.CHECKPOINTS)]
            inside = f"; it holds {', '.join(held[-3:])}: name one of them" if held else ""
            raise RunDirError(f"--resume {path}: not a checkpoint folder ({rundir.CHECKPOINT}N){inside}, or use "
                              f"--resume auto for the newest complete checkpoint of {run_dir}")
        if path.resolve().parent != (run_dir / rundir.CHECKPOINTS).resolve():
            owner = path.resolve().parent.parent
            raise RunDirError(f"--resume {path}: that checkpoint belongs to the run in {owner}, not to output_dir "
                              f"{run_dir}; resume that run with output_dir={owner}, or start a new run from its "
                              "adapter with init_from")
        if not (path / MARKER).is_file():
            raise RunDirError(f"--resume {path}: not a complete checkpoint (no {MARKER} marker); use --resume auto")
        reason = unusable(path)
        if reason is not None:
            raise RunDirError(f"--resume {path}: cannot resume from it: {reason}; use --resume auto to take the "
                              "newest checkpoint that is whole")
        newer = [c.name for c in complete_checkpoints(path.parent) if step_of(c) > step_of(path)]
        if newer:
            raise RunDirError(f"--resume {path}: {', '.join(newer)} went on from it already; resuming here would "
                              "leave them beside the new steps' checkpoints (--resume auto and keep_last would take "
                              f"them for this run's); move them out of {path.parent} first, or start a new run from "
                              f"this checkpoint's adapter with init_from")
        return path
    if rundir.stopped_before_checkpoint(run_dir):
        # Not started over here: with train.save_every null, metrics.jsonl may be all a long run killed left.
        raise RunDirError(f"--resume auto: nothing to resume in {run_dir}: its run stopped before its first "
                          f"checkpoint. The same command without --resume starts over in it, replacing that run's "
                          f"{rundir.METRICS} and TensorBoard events and carrying on its {rundir.LOG}")
    if not (run_dir / rundir.RESOLVED).is_file():
        raise RunDirError(f"--resume: {run_dir} holds no run ({rundir.RESOLVED} missing); check output_dir")
    found = latest_complete(run_dir / rundir.CHECKPOINTS)
    if found is None:
        raise RunDirError(
            f"--resume auto: no complete checkpoint in {run_dir / rundir.CHECKPOINTS}; start a new run "
            "with another output_dir, or set train.save_every so checkpoints are written"
        )
    return found


def refuse_finished(run_dir: Path, checkpoint: Path, train) -> None:
    """A finished run is resumed only to train further: its artifacts would otherwise be rewritten for nothing."""
    try:
        steps = int(rundir.read_manifest(run_dir)["steps"])
    except (KeyError, ValueError, TypeError):
        return
    patience, max_steps = train.early_stopping.patience, train.max_steps
    if stopped_early(Path(checkpoint), patience):
        raise RunDirError(f"{run_dir} is already complete: early stopping ended it at step {steps} (checkpoint "
                          f"{Path(checkpoint).name}); raise train.early_stopping.patience above {patience}, or set it "
                          "to null, (with --allow-changes) to continue it, or start a new run with another output_dir")
    if max_steps is None or max_steps <= steps:
        how = ("a run counted in epochs is carried on by steps: set train.max_steps" if max_steps is None else
               "raise train.max_steps")
        raise RunDirError(f"{run_dir} is already complete at step {steps} (checkpoint {Path(checkpoint).name}); "
                          f"{how} above {steps} (with --allow-changes) to continue it, or start a new run with "
                          "another output_dir")


def check_compatible(config, checkpoint: Path, fingerprints: dict, allow_changes: bool) -> None:
    """Refuse to resume with another config or other data, unless allowed; list what differs (as a warning when
    allowed)."""
    marker = read_marker(checkpoint)
    run_dir = Path(checkpoint).parents[1]
    problems = []
    if marker.get("config") != fingerprints["config"]:
        # A fingerprint of an earlier loraforge may count keys a resume now changes freely: the keys decide.
        before = _flat(load_config(run_dir / rundir.RESOLVED).model_dump(mode="json"))
        now = _flat(config.model_dump(mode="json"))
        for key in sorted(set(before) | set(now)):
            if not ignored_on_resume(key) and before.get(key) != now.get(key):
                problems.append(f"{key}: {before.get(key)!r} in the checkpoint's run, {now.get(key)!r} now")
    if marker.get("data") != fingerprints["data"]:
        problems.append(f"the data differs from the checkpoint's: {_data_change(run_dir, config)}")
    if "precision" in marker and marker["precision"] != fingerprints.get("precision"):
        problems.append(f"precision: {marker['precision']} in the checkpoint's run, {fingerprints.get('precision')} now, "
                        "so the steps that follow compute differently from those before")
    if marker.get("processes", 1) != fingerprints.get("processes", 1):
        problems.append(f"processes: {marker.get('processes', 1)} in the checkpoint's run, {fingerprints['processes']} "
                        "now, which changes the global batch and where in the data the run goes on; resume with the "
                        "same --nproc and --nnodes")
    if problems and allow_changes:
        log.warning("resuming from %s with changes (--allow-changes):\n  %s", checkpoint, "\n  ".join(problems))
    elif problems:
        raise ConfigError(problems + ["pass --allow-changes to resume anyway"], source=f"resume from {checkpoint}")


def resumed_precision(requested: str, checkpoint: Path | None) -> Precision | None:
    """precision auto, resumed: the dtype the checkpoint's run trained in (recorded in its marker), not a new
    measurement, which on a busy or another machine may choose differently. None where there is none to keep."""
    if requested != "auto" or checkpoint is None:
        return None
    chosen = read_marker(checkpoint).get("precision")
    if chosen is None:
        return None
    log.info("precision auto -> %s: the run resumed from %s trained in it", chosen, Path(checkpoint).name)
    return Precision(requested, chosen, f"the run resumed from {Path(checkpoint).name} trained in it")


def _data_change(run_dir: Path, config) -> str:
    """Which data files changed since the run started (manifest.json's sha256 of each), or, where none did, what
    else goes into the tokens."""
    trained = rundir.read_manifest(run_dir).get("data_files") or {}
    now = data_fingerprints(config.data.sources)
    changed = [path for path in now if path in trained and trained[path] != now[path]]
    added, removed = [p for p in now if p not in trained], [p for p in trained if p not in now]
    said = ([f"{path} changed since the run read it" for path in changed] + [f"{path} was added" for path in added]
            + [f"{path} is no longer read" for path in removed])
    if said and trained:
        return "; ".join(said)
    return ("its files are as they were, so the tokenizer, the data settings or how this version of loraforge "
            "tokenizes them changed")


def _flat(data, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def trains_on(checkpoint: Path, total_steps: int, patience: int | None) -> bool:
    """Whether a run of total_steps optimizer steps resumed from the checkpoint takes steps: not when it stopped at
    its last step, nor when early stopping (at the patience the run resumes with) ended it there."""
    return step_of(Path(checkpoint)) < total_steps and not stopped_early(Path(checkpoint), patience)


def stopped_early(checkpoint: Path, patience: int | None) -> bool:
    """Whether the checkpoint's evaluations without improvement reach the patience (HF saves early stopping's count
    in the checkpoint's trainer_state.json); never with patience None."""
    if patience is None:
        return False
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    saved = state.get("stateful_callbacks", {})
    entry = next((saved[name] for name in ("EarlyStopping", "EarlyStoppingCallback") if name in saved), None)
    return isinstance(entry, dict) and entry.get("attributes", {}).get("early_stopping_patience_counter", 0) >= patience


def rewind_metrics(metrics_path: Path, checkpoint: Path, trains: bool) -> dict | None:
    """Drop records logged after the checkpoint's step and, when the resumed run trains, the end-of-training summary
    (train_loss) of the session that stopped there: the run's own comes at its end. Return the step-0 evaluation if
    there is one."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    step = step_of(Path(checkpoint))
    records = rundir.read_metrics(metrics_path)
    kept = [r for r in records if r.get("step", 0) <= step and not (trains and "train_loss" in r)]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return next((r for r in kept if r.get("step") == 0 and "eval_loss" in r), None)


def carry_on(run_dir: Path, command: list[str] | None) -> str:
    """What a stopped run can do next: resume from its last complete checkpoint, or, with none written, start again,
    in its directory where the run left no more than it writes before its first checkpoint. command: as
    resume_command takes it."""
    checkpoint = latest_complete(Path(run_dir) / rundir.CHECKPOINTS)
    way = rundir.how_to_go_on(run_dir, checkpoint)
    if way == "resume":
        return f"Last complete checkpoint: {checkpoint}. Resume with: {resume_command(command, run_dir)}"
    if way == "start over":
        return (f"No complete checkpoint was written: start the run again with: {train_command(command, run_dir)} "
                f"(it starts over in {run_dir}).")
    if (Path(run_dir) / rundir.RESOLVED).is_file():
        return (f"No complete checkpoint was written, so there is nothing to resume: delete {run_dir} and start the "
                "run again, or start it with another output_dir.")
    return f"The run had not started writing to {run_dir}: start it again with the same command."


def resume_command(command: list[str] | None, run_dir: Path) -> str:
    """The train command line that carries this run on: the same config and overrides, then --resume auto."""
    return shlex.join(_train_args(command, run_dir) + ["--resume", "auto"])


def train_command(command: list[str] | None, run_dir: Path) -> str:
    """The train command line that starts this run again in run_dir: the same config and overrides (its output_dir
    as filled in, where it names {time})."""
    return shlex.join(_train_args(command, run_dir))


def _train_args(command: list[str] | None, run_dir: Path) -> list[str]:
    return ["loraforge", "train", *(command or ["CONFIG", f"output_dir={run_dir}"])]
