"""A training run, top to bottom: prepare (config → tokenizer, data, precision) → build (model, trainer) →
train (then the weights it ends with, written at once) → finish (evaluation, samples, report, summary). Each stage
is a function of its own module; this one orders them."""

import functools
import logging
import logging.handlers
import os
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed
from transformers.utils import logging as transformers_logging

from loraforge import rundir
from loraforge.config import RunConfig, write_resolved
from loraforge.config.env import scoped_environment
from loraforge.config.output_dir import expand_output_dir, remove_if_unused
from loraforge.data.cache import cache_key
from loraforge.errors import RunDirError, TrainingStopped
from loraforge.model.precision import choose_precision, join_cpu_processes
from loraforge.rundir import step_of
from loraforge.training import evaluation, finish
from loraforge.training.batch import accumulation, describe_batch, short_epoch, world_size
from loraforge.training.build import (Built, build_trainer, check_kto_batches, check_optimizer, check_sharding,
                                      train_examples, trainable_model, warmup_outlasting)
from loraforge.training.checkpoints import bytes_to_write, latest_complete
from loraforge.training.finish import TrainResult
from loraforge.training.manifest import write_start
from loraforge.training.prepare import Prepared, prepare
from loraforge.training.resume import (carry_on, check_compatible, config_fingerprint, find_checkpoint,
                                      refuse_finished, resume_command, resumed_precision, stopped_early,
                                      trains_on)
from loraforge.training.trackers import check_trackers
from loraforge.training.trainer import SignalAfterTraining, SignalStop, StoppedAtOnce

log = logging.getLogger("loraforge.train")

# What a collective raises in a process whose peer is gone: gloo's socket errors, NCCL's ncclRemoteError.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote process exited or there was a network error")


@dataclass
class Trained:
    before: dict
    after: dict
    base_answers: list[str] | None
    chats: list[list[dict]]
    eval_seconds: float | None
    wall: float
    weights: dict


def run_training(config: RunConfig, resume: str | None = None, allow_changes: bool = False,
                 command: list[str] | None = None, disposable: bool = False) -> TrainResult:
    """Train from a config; with resume ("auto" or a checkpoint folder), carry on a run from its checkpoint.
    command: the config path and overrides this run was started with, for the resume command it prints.
    disposable: the run's folder is thrown away after it (estimate's probe), so a signal stops it at once, raising
    StoppedAtOnce, rather than after its step, its evaluation and a checkpoint."""
    started = time.perf_counter()
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:
        # Every process computes the same summaries and loads the same weights; rank 0 tells of them, the others
        # speak only to warn.
        logging.getLogger("loraforge").setLevel(logging.WARNING)
        transformers_logging.disable_progress_bar()
    if resume and "{time}" in config.output_dir:
        raise RunDirError(f"output_dir {config.output_dir!r} names a new directory at every start; to resume, "
                                 "name the run's directory: output_dir=runs/... --resume auto")
    named = "{" not in config.output_dir
    config = expand_output_dir(config, reserve=is_main)
    if not named and command is not None:
        command = [*command, f"output_dir={config.output_dir}"]
    if resume and is_main:
        # A run still loading looks like one that stopped before its first checkpoint.
        rundir.refuse_in_use(Path(config.output_dir))
    checkpoint = find_checkpoint(Path(config.output_dir), resume) if resume else None
    if checkpoint is not None:
        refuse_finished(Path(config.output_dir), checkpoint, config.train)
        if config.train.max_steps is not None and step_of(checkpoint) > config.train.max_steps:
            raise RunDirError(f"{checkpoint.name} is past train.max_steps={config.train.max_steps}; resume with "
                              f"train.max_steps of at least {step_of(checkpoint)}, or take an earlier checkpoint with "
                              "--resume CHECKPOINT")
    if checkpoint is not None and is_main:
        rundir.refuse_linked_files(Path(config.output_dir))
    if checkpoint is None and is_main:
        rundir.ensure_free(config.output_dir)
    with ExitStack() as held:
        if not named:
            held.callback(remove_if_unused, config.output_dir)
        held.callback(logging.getLogger("loraforge").setLevel, logging.getLogger("loraforge").level)
        # TensorBoardCallback reads its folder from the environment when the trainer is built, the trackers their
        # project names when the run begins; the caller's own variables come back at the end.
        held.enter_context(scoped_environment({"TENSORBOARD_LOGGING_DIR": str(Path(config.output_dir) / rundir.TENSORBOARD),
                                               **config.tracking.environment()}))
        stop = SignalStop(at_once=disposable)
        held.enter_context(_interrupt_says_what_next(Path(config.output_dir), command, stop))
        early = held.enter_context(_held_log(config.logging.level)) if is_main else None
        if checkpoint is not None and is_main:
            held.enter_context(rundir.in_use(Path(config.output_dir)))
        if is_main:
            check_trackers(config.report_to)
        check_optimizer(config.train.optimizer)
        check_sharding()
        rundir.check_init_from(config)
        accumulation(config.train, world_size())
        set_seed(config.seed)
        prepared = prepare(config)
        check_kto_batches(config, prepared)
        log.info("model %s (%s); data: %s", config.model.name, prepared.model_path, prepared.stats.summary())
        _log_batch(config, prepared, is_main)
        with stops_with_its_peers(Path(config.output_dir), command):
            join_cpu_processes()
            precision = (resumed_precision(config.precision, checkpoint)
                         or choose_precision(config.precision, prepared.model_config))
        model = trainable_model(config, prepared, precision.chosen)
        fingerprints = {"config": config_fingerprint(config),
                        "data": cache_key(config.data, config.seed, prepared.tokenizer, prepared.stop_ids),
                        "processes": world_size(), "precision": precision.chosen}
        if checkpoint is not None:
            check_compatible(config, checkpoint, fingerprints, allow_changes)
        if is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            written = sum(p.stat().st_size for p in Path(config.output_dir).rglob("*") if p.is_file()) if checkpoint else 0
            rundir.check_space(config.output_dir, max(bytes_to_write(config.train, trainable) - written, 0))
        run_dir = rundir.create(config.output_dir) if checkpoint is None and is_main else Path(config.output_dir)
        if checkpoint is None and is_main:
            held.enter_context(rundir.in_use(run_dir))
            rundir.start_over(run_dir)
        handler = _log_to_file(run_dir / rundir.LOG, config.logging.level, early) if is_main else None
        try:
            if is_main:
                write_resolved(config, run_dir)
                write_start(run_dir, config, precision.record())
            built = build_trainer(config, prepared, model, run_dir, precision.chosen, fingerprints, stop)
            warmup = (warmup_outlasting(config.train, built.trainer.steps_of_run())
                      if is_main and config.train.warmup_steps is not None else None)
            if warmup:
                log.warning("%s", warmup)
            with _signal_after_training_says_what_is_left(config, built, run_dir, command):
                trained = train(config, prepared, built, run_dir, checkpoint, stop, is_main, command)
                if not is_main:
                    return TrainResult(run_dir, trained.before.get("eval_loss"), trained.after.get("eval_loss"),
                                       trained.wall, None)
                return finish_run(config, prepared, built, trained, run_dir, checkpoint, fingerprints, precision,
                                  started, stop)
        except TrainingStopped as exc:
            if handler is not None:
                handler.handle(logging.LogRecord("loraforge", logging.ERROR, __file__, 0, str(exc), None, None))
            raise
        finally:
            stop.uninstall()
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _log_batch(config: RunConfig, prepared: Prepared, is_main: bool) -> None:
    examples, drop_last = train_examples(config, prepared), config.method == "kto"
    log.info("%s", describe_batch(config.train, world_size(), examples, drop_last))
    warning = short_epoch(config.train, world_size(), examples, drop_last)
    if warning and is_main:
        log.warning("%s", warning)


def train(config: RunConfig, prepared: Prepared, built: Built, run_dir: Path, checkpoint: Path | None,
          stop: SignalStop, is_main: bool, command: list[str] | None) -> Trained:
    """Evaluate what must come first, train, stop cleanly on a signal or a non-finite loss, write the weights the
    run ends with, evaluate them."""
    with stops_with_its_peers(run_dir, command):
        return _train(config, prepared, built, run_dir, checkpoint, stop, is_main, command)


@contextmanager
def stops_with_its_peers(run_dir: Path, command: list[str] | None):
    """One of several processes whose collective lost a peer (agreeing on the precision, evaluating or training)
    stops with one line."""
    try:
        yield
    except RuntimeError as exc:
        if world_size() > 1 and any(sign in str(exc) for sign in PEER_LOST):
            raise TrainingStopped(
                f"another process of this run stopped ({_first_sentence(exc)}), so process rank "
                f"{os.environ.get('RANK', '0')} stops too. {carry_on(run_dir, command)}",
                exit_code=1) from None
        raise


def _train(config: RunConfig, prepared: Prepared, built: Built, run_dir: Path, checkpoint: Path | None,
           stop: SignalStop, is_main: bool, command: list[str] | None) -> Trained:
    trainer, has_val = built.trainer, prepared.val is not None
    before = evaluation.evaluate_before(trainer, config, has_val, checkpoint, run_dir, is_main)
    eval_seconds = before.get("eval_runtime")
    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
    chats = evaluation.sample_chats(config, prepared.val_prompts, prepared.tokenizer) if is_main else []
    base_answers = evaluation.base_answers_before(config, built.model, prepared.tokenizer, prepared.stop_ids, chats)
    stop.install()
    began = time.perf_counter()
    patience = config.train.early_stopping.patience
    if checkpoint is not None and not trains_on(checkpoint, trainer.steps_of_run(), patience):
        log.info("%s is where the run %s: nothing left to train", checkpoint.name,
                 "stopped early" if stopped_early(checkpoint, patience) else "ends")
        trainer.restore_without_training(str(checkpoint))
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    wall = time.perf_counter() - began
    _raise_if_stopped(config, trainer, stop, run_dir, command)
    with stop.writing():
        weights = evaluation.weights_origin(trainer, config, has_val)
        evaluation.use_weights(trainer, config, weights)
        if is_main:
            finish.save_model(config, built.model, prepared.tokenizer, run_dir, prepared.labels)
    after = evaluation.evaluate_after(trainer, config, has_val, weights)
    if has_val and evaluation.adapter_off_is_base(config):
        before, eval_seconds = evaluation.evaluate_base_after(trainer, built.model, config, run_dir, is_main)
    return Trained(before, after, base_answers, chats, eval_seconds, wall, weights)


def _raise_if_stopped(config: RunConfig, trainer, stop: SignalStop, run_dir: Path, command: list[str] | None) -> None:
    """A non-finite loss, or a signal that stopped training at a step before its last. A signal in the last step, or
    once training ended (its last step, early stopping), stops the run after its weights are written
    (`SignalStop.writing`)."""
    if trainer.poisoned_step is not None:
        raise TrainingStopped(
            f"the training loss became NaN or inf at step {trainer.poisoned_step} (train.nan_patience="
            f"{config.train.nan_patience}); stopped without saving that state. Last good checkpoint: "
            f"{latest_complete(run_dir / rundir.CHECKPOINTS) or 'none'}. Lower train.learning_rate or check the "
            "data, then resume or restart",
            exit_code=3,
        )
    if stop.received and stop.stopping and trainer.state.global_step < trainer.steps_of_run():
        resume_hint = resume_command(command, run_dir)
        raise TrainingStopped(
            f"stopped by {stop.received} after step {trainer.state.global_step}; checkpoint "
            f"{latest_complete(run_dir / rundir.CHECKPOINTS)} written. Resume with: {resume_hint}",
            exit_code=130 if stop.received == "SIGINT" else 143,
        )


@contextmanager
def _signal_after_training_says_what_is_left(config: RunConfig, built: Built, run_dir: Path, command: list[str] | None):
    """SIGTERM or SIGINT once the run's weights are written (in its final evaluation, sample answers, report): one
    line on what it wrote and what not, and the command that writes the rest."""
    try:
        yield
    except SignalAfterTraining as exc:
        raise TrainingStopped(
            finish.stopped_after_training(exc.name, config, run_dir, built.trainer.state.global_step,
                                          resume_command(command, run_dir)),
            exit_code=130 if exc.name == "SIGINT" else 143) from None


def _first_sentence(exc: Exception) -> str:
    """The gist of a collective's error: "[path/pair.cc:553] Connection closed by peer [addr]. More." and "NCCL
    error in: path.cpp:3763, remote process exited or there was a network error, NCCL version 2.28.8" -> the middle."""
    text = str(exc).splitlines()[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    if text.startswith("NCCL error") and ", " in text:
        text = text.split(", ", 1)[1].split(", NCCL version", 1)[0]
    return text.split(". ", 1)[0]


def finish_run(config: RunConfig, prepared: Prepared, built: Built, trained: Trained, run_dir: Path,
               checkpoint: Path | None, fingerprints: dict, precision, started: float, stop: SignalStop) -> TrainResult:
    trainer, throughput = built.trainer, built.throughput
    marks = [time.perf_counter()]
    samples = evaluation.sample_answers(config, built.model, prepared.tokenizer, prepared.stop_ids, trained.chats,
                                        trained.base_answers)
    marks.append(time.perf_counter())
    test = evaluation.evaluate_test(config, built.model, prepared.tokenizer, prepared.stop_ids, prepared.labels)
    marks.append(time.perf_counter())
    preference = evaluation.evaluate_pairs(config, built.model, prepared)
    marks.append(time.perf_counter())
    timing = {
        "step_seconds": throughput.step_seconds,
        "step_padded_tokens": built.padded.per_step,
        "setup_seconds": throughput.train_began_at - started if throughput.train_began_at else None,
        "eval_seconds": trained.eval_seconds,
        "first_step_seconds": throughput.first_step_done_at - started if throughput.first_step_done_at else None,
        "samples_seconds": marks[1] - marks[0],
        # The rounds of eval.samples_during_training: answers in each, seconds of each.
        "sample_round_answers": len(built.sampler.chats) if built.sampler else 0,
        "sample_round_seconds": built.sampler.seconds if built.sampler else [],
        "test_seconds": marks[2] - marks[1],
        "pairs_seconds": marks[3] - marks[2],
    }
    with stop.writing(last=True):
        finish.write_results(config, run_dir, trained.before, trained.after, samples, prepared.stats, {
            "trainable_parameters": built.trainable_parameters,
            "train_seconds": round(throughput.train_seconds, 2),
            "wall_seconds": round(trained.wall, 2),
            "first_step_seconds": round(timing["first_step_seconds"], 2) if timing["first_step_seconds"] else None,
            # This process's tokens, as train_seconds and padded_tokens count them (a resumed run's earlier ones
            # are not).
            "real_tokens": trainer.state.num_input_tokens_seen - throughput.tokens_at_start,
            "padded_tokens": trainer.padded_tokens,
            "weights": {k: v for k, v in trained.weights.items() if k != "checkpoint"},
            "test": test,
            "preference": preference,
        })
        finish.write_run_manifest(config, run_dir, fingerprints, built.trainable_parameters, trained.wall, checkpoint,
                                  trainer.state.global_step, precision)
    return TrainResult(
        run_dir, trained.before.get("eval_loss"), trained.after.get("eval_loss"), trained.wall,
        throughput.session_tokens_per_s(trainer.state), samples,
        metrics=evaluation.metric_values(trained.after), precision=precision.chosen,
        total_seconds=time.perf_counter() - started, timing=timing, weights=trained.weights, test=test,
        preference=preference, task=config.task,
    )


@contextmanager
def _interrupt_says_what_next(run_dir: Path, command: list[str] | None, stop: SignalStop):
    """Ctrl-C or SIGTERM while the run loads (in training either stops the run at the end of its step, after it the
    run says what it wrote), or a second Ctrl-C: what the run left and the command that goes on from there. Once the
    run is complete, as it lets go of its signals, run directory and log, either stops nothing. A process of several
    leaves SIGTERM to torchrun, which ends them all."""
    previous = {}
    if world_size() == 1 and threading.current_thread() is threading.main_thread():
        handler = functools.partial(_interrupt, stop)
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except Terminated:
        raise TrainingStopped(f"stopped by SIGTERM before training. {carry_on(run_dir, command)}",
                              exit_code=143) from None
    except KeyboardInterrupt:
        raise TrainingStopped(f"interrupted. {carry_on(run_dir, command)}", exit_code=130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Terminated(BaseException):
    """SIGTERM before training, raised where the run is, as Ctrl-C raises KeyboardInterrupt."""


def _interrupt(stop: SignalStop, signum, frame):
    if stop.complete:
        return stop.too_late(signum)
    if stop.at_once:
        raise StoppedAtOnce(signal.Signals(signum).name)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def _held_log(level: str):
    """What the run logs before its directory exists (the data summary, the batch, the precision chosen), held for
    train.log."""
    memory = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
    memory.setLevel(level)
    logging.getLogger().addHandler(memory)
    logging.getLogger("loraforge").setLevel(level)
    try:
        yield memory
    finally:
        logging.getLogger().removeHandler(memory)
        memory.close()


def _log_to_file(path: Path, level: str = "INFO", early: logging.handlers.MemoryHandler | None = None) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if early is not None:
        logging.getLogger().removeHandler(early)
        early.setTarget(handler)
        early.flush()
    logging.getLogger().addHandler(handler)
    logging.getLogger("loraforge").setLevel(level)
    return handler
