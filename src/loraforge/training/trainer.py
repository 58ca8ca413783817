"""HF Trainer with atomic checkpoints, a NaN/inf guard and a clean stop on SIGTERM/SIGINT."""

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from torch.optim.lr_scheduler import LambdaLR
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from loraforge.errors import LoraforgeError
from loraforge.internals import IGNORE, HookedTrainer, put_on_schedule
from loraforge.rundir import STAGING, open_as_umask
from loraforge.training.checkpoints import PREFIX, latest_complete, publish, read_marker, rotate
from loraforge.training.loss import trained_positions_loss, trained_tokens_per_row
from loraforge.training.recompute import recomputed_layers

log = logging.getLogger("loraforge.train")


def length_grouped_order(lengths: list[int], group_size: int, seed: int) -> list[int]:
    """Indices in groups of similar length (little padding), the groups in random order except that the group
    holding the longest sample comes second: memory peaks within the first two steps (an out-of-memory shows
    at once, and `estimate`'s probe measures the peak), while the first step, an ordinary one, reports
    within seconds instead of being the slowest step of the epoch.

    HF's grouping alone sorts each mega-batch longest first, so a run shorter than an epoch would train
    on the longest samples only; shuffling the groups keeps the padding saving without that bias.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    order = get_length_grouped_indices(lengths, group_size, generator=generator)
    groups = [order[i : i + group_size] for i in range(0, len(order), group_size)]
    rest = [1 + g for g in torch.randperm(len(groups) - 1, generator=generator).tolist()]
    return [index for g in [*rest[:1], 0, *rest[1:]] for index in groups[g]]


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches in a random order drawn from a generator seeded per epoch, so a resumed run
    sees the same order as a straight one (HF's sampler draws from the global RNG)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))


def row_slices(inputs: dict, max_tokens: int) -> list[dict]:
    """The batch cut into runs of whole rows of at most max_tokens padded tokens (at least one row each), each cut
    to its own longest row: a slice's padding columns are never computed, and a slice with none needs no mask
    (transformers then takes SDPA's causal kernel, which keeps no attention weights for backward)."""
    rows, length = inputs["input_ids"].shape
    per_slice = max(1, max_tokens // length)
    if per_slice >= rows:
        return [inputs]
    pieces = [
        {k: v[start : start + per_slice] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
         for k, v in inputs.items()}
        for start in range(0, rows, per_slice)
    ]
    return [without_padding_columns(piece) for piece in pieces]


def without_padding_columns(inputs: dict) -> dict:
    """Right-padded rows cut after the last column any of them attends to."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return inputs
    length = mask.shape[1]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else length
    if used == length:
        return inputs
    return {k: v[:, :used] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == length else v
            for k, v in inputs.items()}


def pair_lengths(pairs) -> list[int]:
    """Tokens of each preference pair's longer side: its prompt and its longer answer."""
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"])]


class CheckpointError(LoraforgeError):
    """A checkpoint could not be written; the previous complete one is untouched."""


class RunLifecycle:
    """What every loraforge trainer adds to its HF/TRL base: seeded length grouping, atomic checkpoints, padded
    token counts and a flag for the NaN guard. Mixed in before a TrainerHooks class (internals/)."""

    def __init__(self, *args, keep_last: int = 2, fingerprints: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_last = keep_last
        self.fingerprints = fingerprints or {}
        self.step_had_nonfinite_loss = False
        self.poisoned_step: int | None = None
        self.padded_tokens = 0

    def train_sampler(self, sampler):
        if isinstance(sampler, LengthGroupedSampler):
            return SeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                              seed=self.args.data_seed or self.args.seed)
        return sampler

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.padded_tokens += self.padded_tokens_of(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            self.step_had_nonfinite_loss = True
        return loss

    def padded_tokens_of(self, inputs) -> int:
        return int(inputs["input_ids"].numel()) if "input_ids" in inputs else 0

    def save_checkpoint(self, write) -> None:
        """HF writes checkpoint-N into a staging folder; marked COMPLETE, it is renamed into place in one step."""
        step = self.state.global_step
        root = Path(self.args.output_dir)
        if self.poisoned_step is not None:
            log.warning("no checkpoint at step %d: the loss went non-finite at step %d", step, self.poisoned_step)
            return
        loss = self.loss_bookkeeping()
        staging_root = root / f"{STAGING}{step}"
        self.args.output_dir = str(staging_root)
        try:
            write()
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                open_as_umask(staging_root)
        except OSError as exc:
            shutil.rmtree(staging_root, ignore_errors=True)
            previous = latest_complete(root)
            reason = "the disk is full" if exc.errno == errno.ENOSPC else f"{exc.strerror or exc}"
            raise CheckpointError(
                f"could not write checkpoint {PREFIX}{step} in {root}: {reason}. Nothing was counted as complete; "
                f"the last complete checkpoint is {previous or 'none'}. Free space and resume with --resume auto"
            ) from exc
        except BaseException:
            shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self.args.output_dir = str(root)
        if not self.args.should_save:
            return
        final = root / f"{PREFIX}{step}"
        staged = staging_root / final.name
        best = root / f"{PREFIX}{self.state.best_global_step}" if self.state.best_global_step else None
        _point_state_at(staged, best)
        publish(staged, final, {"step": step, **self.fingerprints, "loss": loss})
        shutil.rmtree(staging_root, ignore_errors=True)
        if best is not None and best.exists():
            self.state.best_model_checkpoint = str(best)
        rotate(root, self.keep_last, keep={best} if best is not None else set())
        log.info("checkpoint %s written", final)



class LoraforgeTrainer(RunLifecycle, HookedTrainer):
    """Supervised fine-tuning (causal LM or classification)."""

    def __init__(self, *args, causal_lm: bool = False, micro_batch_tokens: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal_lm = causal_lm
        self.micro_batch_tokens = micro_batch_tokens
        self._trained_per_row: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Causal LM: logits and loss at trained positions only (train/loss.py), the same value as the model's
        own loss. Under autocast, peft's cast of each LoRA input to fp32 is skipped: autocast casts it back to
        bf16 for the matmul anyway, and the fp32 copies are kept for backward."""
        if not self.causal_lm or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        per_token_eval = not model.training and self._trained_per_row is not None and "position_ids" not in inputs
        if per_token_eval:
            # HF averages the batches' losses weighted by rows; dividing each batch's sum by rows x the split's
            # trained tokens per row makes that average the mean over every trained token of the split. Rows that
            # pad out the last batches of several processes are masked and not counted: gather_for_metrics drops
            # their losses, but not what they would add to their batch's.
            rows = inputs["labels"].shape[0]
            real = self._split_rows_in_batch(rows)
            if real < rows:
                labels = inputs["labels"].clone()
                labels[real:] = IGNORE
                inputs = {**inputs, "labels": labels}
            num_items_in_batch = max(real, 1) * self._trained_per_row
        device = self.args.device.type
        with disable_input_dtype_casting(model, active=torch.is_autocast_enabled(device)):
            loss, outputs = trained_positions_loss(model, inputs, num_items_in_batch,
                                                   unwrapped=self.accelerator.unwrap_model(model))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None and not per_token_eval:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _split_rows_in_batch(self, rows: int) -> int:
        """How many rows of this process's next evaluation batch are the split's own. accelerate deals batch k to
        process k % world size and completes the last ones with rows from the split's start (even_batches)."""
        first = (self._eval_batches * self.args.world_size + self.args.process_index) * self.args.eval_batch_size
        self._eval_batches += 1
        return max(0, min(rows, self._eval_rows - first))

    def evaluation_loop(self, dataloader, *args, **kwargs):
        """Causal eval loss is the mean over the split's trained tokens, whatever the batch size, order and number of
        processes."""
        self._trained_per_row = trained_tokens_per_row(dataloader.dataset) if self.causal_lm else None
        self._eval_rows, self._eval_batches = len(dataloader.dataset), 0
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self._trained_per_row = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A micro-batch over micro_batch_tokens padded tokens runs as row slices, one forward and backward each.
        The causal loss is a sum over the step's trained tokens divided by num_items_in_batch, so the slices'
        gradients add up to those of the whole micro-batch while the activations of one slice only are alive.
        A single row longer than the budget recomputes its layers in backward (training/recompute.py)."""
        budget = self.micro_batch_tokens if self.causal_lm and num_items_in_batch is not None else None
        pieces = row_slices(inputs, budget) if budget else [inputs]
        loss = None
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            too_long = budget is not None and piece["input_ids"].numel() > budget
            with (contextlib.nullcontext() if last else self.accelerator.no_sync(model),
                  recomputed_layers(self.accelerator.unwrap_model(model), active=too_long)):
                piece_loss = super().training_step(model, piece, num_items_in_batch)
            loss = piece_loss if loss is None else loss + piece_loss
        return loss


def _point_state_at(staged: Path, best: Path | None) -> None:
    """trainer_state.json was written while the checkpoint sat in staging; point it at the final paths."""
    state_file = staged / "trainer_state.json"
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state["best_model_checkpoint"] = str(best) if best is not None and (best.exists() or best.name == staged.name) else None
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class PaddedTokensPerStep(TrainerCallback):
    """Records the padded tokens each optimizer step computed (all micro-batches), for timing models."""

    def __init__(self, trainer: LoraforgeTrainer):
        self.trainer = trainer
        self.per_step: list[int] = []
        self._at_step_start = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._at_step_start = self.trainer.padded_tokens

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append(self.trainer.padded_tokens - self._at_step_start)


class ScheduleOnResume(TrainerCallback):
    """A resumed run steps at the learning rate its schedule gives for the step it resumes at. The optimizer state
    loaded from the checkpoint carries the rate of the old schedule: after train.max_steps was raised (with
    --allow-changes) that was the old end, 0 for cosine, and the first new step went at it. Unchanged, the two
    agree to the bit. The schedule's peak and the weight decay are the config's (--allow-changes may have changed
    them), not the checkpoint's: HF groups the decayed parameters first, the others after at no decay."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0 or optimizer is None or not isinstance(lr_scheduler, LambdaLR):
            return
        lr_scheduler.base_lrs = [args.learning_rate] * len(lr_scheduler.base_lrs)
        for group in optimizer.param_groups:
            group["initial_lr"] = args.learning_rate
        if len(optimizer.param_groups) == 2:
            optimizer.param_groups[0]["weight_decay"] = args.weight_decay
        put_on_schedule(optimizer, lr_scheduler)


class LossOnResume(TrainerCallback):
    """A resumed run logs the loss a straight run logs: the loss summed since the last log before its checkpoint
    (kept in the checkpoint's marker) counts towards the next log, and the summary's train_loss is the run's."""

    def __init__(self, trainer: LoraforgeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        saved = read_marker(Path(args.output_dir) / f"{PREFIX}{state.global_step}").get("loss")
        if isinstance(saved, dict):
            self.trainer.restore_loss_bookkeeping(saved)


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping, whose count of evaluations without improvement a resumed run carries on from
    its checkpoint (transformers restores it only with every other callback's and the control's state). Its warning
    that the best model will not be loaded does not hold here: the run ends with its best checkpoint."""

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) or state.stateful_callbacks.get("EarlyStoppingCallback")
        if state.global_step > 0 and isinstance(saved, dict):
            self.early_stopping_patience_counter = saved.get("attributes", {}).get("early_stopping_patience_counter", 0)


class NanGuard(TrainerCallback):
    """Stops after `patience` optimizer steps in a row with a non-finite loss. From the first of them no checkpoint
    is saved (its update has most likely made the weights NaN too), unless a finite step shows they recovered."""

    def __init__(self, trainer: LoraforgeTrainer, patience: int):
        self.trainer = trainer
        self.patience = patience
        self.bad_steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self.trainer.step_had_nonfinite_loss:
            self.bad_steps = 0
            self.trainer.poisoned_step = None
            return
        self.trainer.step_had_nonfinite_loss = False
        self.bad_steps += 1
        if self.bad_steps == 1:
            self.trainer.poisoned_step = state.global_step
        control.should_save = False
        if self.bad_steps >= self.patience:
            control.should_evaluate = False
            control.should_training_stop = True


class SignalAfterTraining(BaseException):
    """SIGTERM or SIGINT once training is over, raised where the run is, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class StoppedAtOnce(BaseException):
    """SIGTERM or SIGINT in a run whose folder is thrown away (estimate's probe): raised where the run is, with
    nothing finished or saved."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class SignalStop(TrainerCallback):
    """SIGTERM or SIGINT: finish the optimizer step in flight and the evaluation due at it, save a checkpoint, stop.
    A second SIGINT aborts. With several processes, every step ends with the processes agreeing on the signal (a
    max-reduce of its number): a signal reaching them at different moments still stops all of them after the same
    step. Once training is over (the first `writing()`), a signal raises SignalAfterTraining at once, or where a
    `writing()` block ends, so that no file is left half-written. Once the run is complete (its last `writing()`
    ended), a signal has nothing left to stop: the result stands."""

    def __init__(self, at_once: bool = False):
        self.at_once = at_once
        self.received: str | None = None
        self.stopping = False
        self.trained = False
        self.complete = False
        self.saved_at: int | None = None
        self._writing = False
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.complete:
            return self.too_late(signum)
        if self.at_once:
            raise StoppedAtOnce(signal.Signals(signum).name)
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.received is None
        self.received = signal.Signals(signum).name
        if self.trained and not self._writing and first:
            raise SignalAfterTraining(self.received)
        if int(os.environ.get("RANK", "0")) == 0:
            # Launched processes have sessions of their own: a second Ctrl-C reaches only the launcher.
            again = " (Ctrl-C again to abort)" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else ""
            doing = ("finishing the files being written" if self.trained else
                     "finishing this step and writing a checkpoint")
            log.warning("%s received: %s%s", self.received, doing, again)

    @staticmethod
    def too_late(signum) -> None:
        """A signal once the run is complete, said in the log: it stops nothing."""
        log.warning("%s received once the run was complete: nothing left to stop", signal.Signals(signum).name)

    @contextlib.contextmanager
    def writing(self, last: bool = False):
        """After training: files are being written, and a signal waits for the block's end to stop the run, unless
        the block ends it anyway (`last`)."""
        self.trained = self._writing = True
        try:
            yield
        finally:
            # After the run's last files a signal has nothing left to stop.
            self._writing = last
        self.complete = last
        if self.received and not last:
            raise SignalAfterTraining(self.received)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if args.world_size > 1:
            # Decided by the reduced number alone: a signal handled after the reduce waits for the next step's.
            number = torch.tensor([signal.Signals[self.received].value if stop else 0], device=args.device)
            torch.distributed.all_reduce(number, op=torch.distributed.ReduceOp.MAX)
            stop = bool(number.item())
            if stop and not self.received:
                self.received = signal.Signals(int(number.item())).name
        if stop:
            # The checkpoint is written at the epoch's end, which the stop reaches at once: after the step's
            # evaluation and, where the epoch or the run ends with this step, after the epoch's.
            self.stopping = True
            control.should_save = False
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        """A signal that came while this step's checkpoint was written: that checkpoint is the stop's, so the run
        stops here rather than train one more step and write another. With several processes the stop waits for the
        step's end, where they agree on it."""
        if self.received and not self.stopping and args.world_size == 1:
            self.stopping = True
            self.saved_at = state.global_step
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        """The stop's checkpoint, unless the step's own checkpoint is it. An epoch the signal cut short is not
        evaluated as if it had ended."""
        if not self.stopping:
            return
        control.should_save = self.saved_at != state.global_step
        if not float(state.epoch).is_integer() and state.global_step < state.max_steps:
            control.should_evaluate = False
