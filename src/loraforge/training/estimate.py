"""`loraforge estimate`: seconds per step, total time and peak memory of a config, before the long run
(SFT or a preference method: a DPO step computes both answers of each pair and a reference pass, a KTO step each
example and its KL example, all in the probe's times).

A few real optimizer steps of the config give the peak memory, a fixed cost per step and the seconds per
padded token (fitted on all but the first step), and the first step's extra time (a warm-up, counted once).
The config's own batches, built from the tokenized data in the order training draws them, give the padded
tokens of each step of the run; the step times follow from the fit.

Each evaluation during training answers the first eval.samples_during_training sample prompts; the probe answers
them at its own last evaluation, and each of the run's evaluations is priced at that round's time.

After the last step a run may evaluate its best checkpoint again, answers the sample prompts (with the base too,
where switching the adapter off gives it back; else the base answered before training, in the set-up time), and
evaluates its test split (a preference run also its validation pairs). The probe does the same with the same
prompts and rows, and its times are added; the best checkpoint's evaluation is one more validation evaluation,
planned wherever the run can end with an earlier checkpoint than its last step.

With several processes (`--nproc N`, launched through torchrun like `train`) the probe is a real N-process run:
its steps are timed and its memory taken per process, the largest process's peak reported. The processes take
the batches in turn, and a step lasts as long as its slowest process: each step counts the padded tokens of the
process that computes the most in it.
"""

import math
import re
import resource
import shutil
import tempfile
from dataclasses import dataclass, field

import torch

from loraforge.errors import ConfigError, TrainingStopped
from loraforge.training.batch import accumulation, world_size
from loraforge.training.build import unpaired
from loraforge.training.evaluation import adapter_off_is_base
from loraforge.training.prepare import prepare
from loraforge.training.run import run_training
from loraforge.training.trainer import StoppedAtOnce, length_grouped_order, pair_lengths


@dataclass
class AfterLastStep:
    """What a run does after its last step, each part counted in the estimate's total."""

    best_evaluations: int = 0
    best_seconds: float = 0.0
    sample_answers: int = 0
    samples_seconds: float = 0.0
    test_rows: int = 0
    test_answers: int = 0
    test_seconds: float = 0.0
    validation_rows: int = 0
    pairs_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.best_seconds + self.samples_seconds + self.test_seconds + self.pairs_seconds

    def lines(self) -> list[str]:
        parts = []
        if self.best_evaluations:
            parts.append(f"the best checkpoint evaluated again: {_duration(self.best_seconds)} (when the best "
                         "evaluation is not the last step's)")
        if self.sample_answers:
            parts.append(f"{self.sample_answers} sample answers: {_duration(self.samples_seconds)}")
        if self.test_rows:
            answers = f" and {self.test_answers} answers" if self.test_answers else ""
            parts.append(f"test split, {self.test_rows} rows{answers}: {_duration(self.test_seconds)}")
        if self.validation_rows:
            parts.append(f"held-out preference, {self.validation_rows} validation rows: "
                         f"{_duration(self.pairs_seconds)}")
        if not parts:
            return []
        return [f"after the last step, in the total: {_duration(self.seconds)}", *(f"  {p}" for p in parts)]


@dataclass
class SamplesDuringTraining:
    """eval.samples_during_training: the prompts answered at each evaluation in training (SampleCallback), in the
    estimate's total; a round at an evaluation before training falls in the measured set-up."""

    rounds: int = 0
    answers: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        if not self.answers:
            return []
        return [f"{self.answers} sample answers at {self.rounds} evaluations during training, in the total: "
                f"{_duration(self.seconds)}"]


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.0f} second{'' if round(seconds) == 1 else 's'}"


@dataclass
class Estimate:
    seconds_per_step: float
    total_seconds: float
    peak_rss_mb: float
    steps: int
    padded_tokens_per_step: float
    probe_steps: int
    precision: str
    processes: int = 1
    peak_gpu_mb: float | None = None
    after: AfterLastStep = field(default_factory=AfterLastStep)
    during: SamplesDuringTraining = field(default_factory=SamplesDuringTraining)

    def summary(self) -> str:
        total = _duration(self.total_seconds)
        where = "on this machine" if self.processes == 1 else f"in {self.processes} processes on this machine"
        per = "" if self.processes == 1 else " per process"
        largest = "" if self.processes == 1 else " (the largest process)"
        return (
            f"Estimate from {self.probe_steps} measured steps {where}, in {self.precision}:\n"
            f"  {self.seconds_per_step:.2f} s per optimizer step ({self.padded_tokens_per_step:.0f} padded tokens per "
            f"step{per})\n"
            f"  {self.steps} steps: about {total} in all, evaluations and model loading included (not the "
            "few seconds Python takes to start)"
            + "".join(f"\n  {line}" for line in self.during.lines() + self.after.lines())
            + f"\n  peak memory: {self.peak_rss_mb:.0f} MB process RSS{largest}"
            + ("" if self.peak_gpu_mb is None else
               f"\n  peak GPU memory: {self.peak_gpu_mb:.0f} MB reserved by PyTorch{largest}")
        )


def step_padded_tokens(lengths: list[int], batch_size: int, grad_accum: int, group_by_length: bool,
                       packed: bool, seed: int, steps: int, processes: int = 1) -> list[float]:
    """Padded tokens each of the run's optimizer steps computes in a process (of several, the busiest): under
    length grouping the very batches training draws, epoch after epoch; in a random order or packed, the mean
    over an epoch for every step (an epoch's last step takes the batches left, all of them where grad_accum asks
    for more than an epoch holds)."""
    if packed or not group_by_length:
        if packed:
            per_batch = [sum(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)]
        else:
            generator = torch.Generator()
            generator.manual_seed(seed)
            order = torch.randperm(len(lengths), generator=generator).tolist()
            per_batch = [batch_size * max(lengths[i] for i in order[k : k + batch_size])
                         for k in range(0, len(order), batch_size)]
        per_process = math.ceil(len(per_batch) / processes)
        return [sum(per_batch) / processes / math.ceil(per_process / grad_accum)] * steps
    tokens: list[float] = []
    epoch = 0
    while len(tokens) < steps:
        order = evened(length_grouped_order(lengths, batch_size * grad_accum, seed + epoch), batch_size, processes)
        per_batch = [len(order[k : k + batch_size]) * max(lengths[i] for i in order[k : k + batch_size])
                     for k in range(0, len(order), batch_size)]
        tokens += busiest_process_steps(per_batch, grad_accum, processes)
        epoch += 1
    return tokens[:steps]


def evened(order: list[int], batch_size: int, processes: int) -> list[int]:
    """An epoch's order as several processes draw it: accelerate completes a short last batch, and a last round with
    fewer batches than processes, with rows from the start of the epoch."""
    if processes == 1:
        return order
    missing = -len(order) % (batch_size * processes)
    return order + (order * math.ceil(missing / len(order)))[:missing]


def busiest_process_steps(per_batch: list[int], grad_accum: int, processes: int) -> list[int]:
    """Tokens of each optimizer step of an epoch in the process that computes the most in it. The processes take
    an epoch's batches in turn (batch k goes to process k mod N, as accelerate shards a data loader), grad_accum of
    their own a step; the epoch's last step takes what is left."""
    rounds = [per_batch[k : k + processes] for k in range(0, len(per_batch), processes)]
    return [max(sum(r[p] for r in rounds[s : s + grad_accum] if p < len(r)) for p in range(processes))
            for s in range(0, len(rounds), grad_accum)]


def step_time_model(seconds: list[float], tokens: list[int]) -> tuple[float, float]:
    """(fixed seconds per step, seconds per padded token) by least squares; through the origin when the
    measured steps are too alike in size to separate the two."""
    n = len(seconds)
    mean_t, mean_s = sum(tokens) / n, sum(seconds) / n
    spread = sum((t - mean_t) ** 2 for t in tokens)
    if n >= 3 and spread > 0 and max(tokens) > 1.3 * min(tokens):
        slope = sum((t - mean_t) * (s - mean_s) for t, s in zip(tokens, seconds)) / spread
        fixed = mean_s - slope * mean_t
        if slope > 0 and fixed >= 0:
            return fixed, slope
    return 0.0, sum(seconds) / sum(tokens)


def run_estimate(config, probe_steps: int = 6, probe_dir: str | None = None) -> Estimate | None:
    """probe_dir: the probe run's directory, made and removed by the caller (one for every process of a launch);
    by default a temporary one. None in a process other than rank 0, which alone has the timings."""
    if config.task != "causal_lm":
        raise ConfigError(["estimate covers task causal_lm; a classification run's steps are short, just start it"])
    if probe_steps < 3:
        raise ConfigError([f"--probe-steps {probe_steps}: use 3 or more (the first is a warm-up, the longest batch comes second)"])

    probe = config.model_copy(update={
        "output_dir": probe_dir or tempfile.mkdtemp(prefix="loraforge-estimate-"),
        "train": config.train.model_copy(update={"max_steps": probe_steps, "num_epochs": None, "save_every": None,
                                                 "eval_every": 10**9}),
        "report_to": [],
    })
    try:
        result = run_training(probe, disposable=True)
    except StoppedAtOnce as exc:
        raise TrainingStopped(f"no estimate: stopped by {exc.name} during its probe run; nothing is kept (the probe "
                              "ran in a temporary folder)", 130 if exc.name == "SIGINT" else 143) from None
    except TrainingStopped as exc:
        # Its message names the probe's folder, a checkpoint and a resume command: none of them outlive the estimate.
        how = re.split("[:;]", str(exc), maxsplit=1)[0]
        raise TrainingStopped(f"no estimate: its probe run ended early ({how}); nothing is kept (the probe ran in a "
                              "temporary folder)", exc.exit_code) from None
    finally:
        if probe_dir is None:
            shutil.rmtree(probe.output_dir, ignore_errors=True)
    peak_rss_mb, peak_gpu_mb = _largest_process_peaks_mb()
    if not result.timing:
        return None
    measured_seconds, measured_tokens = result.timing["step_seconds"], result.timing["step_padded_tokens"]
    fixed, per_token = step_time_model(measured_seconds[1:], measured_tokens[1:])

    train, processes = config.train, world_size()
    accum = accumulation(train, processes)
    if config.method == "kto":
        prompts, answers = _kto_examples(config)
        # KTO drops an epoch's partial last batch, and with several processes its partial last round of batches.
        per_epoch, steps = optimizer_steps(train, len(prompts) // train.batch_size // processes, accum)
        tokens = kto_step_padded_tokens(prompts, answers, train.batch_size, accum, steps, config.data.max_length,
                                        processes)
    else:
        lengths = _train_lengths(config)
        per_epoch, steps = optimizer_steps(train, math.ceil(math.ceil(len(lengths) / train.batch_size) / processes),
                                           accum)
        tokens = step_padded_tokens(lengths, train.batch_size, accum, train.group_by_length, config.data.packing,
                                    config.seed, steps, processes)
    if config.method in ("dpo", "orpo"):
        # A pair is two sequences, chosen and rejected, padded to one length; the probe's step times already hold
        # the reference pass.
        tokens = [2 * t for t in tokens]
    warm_up = measured_seconds[0] - (fixed + per_token * measured_tokens[0])
    step_seconds = [fixed + per_token * t for t in tokens]
    step_seconds[0] += max(warm_up, 0.0)
    after = after_last_step(config, result,
                            best_evaluations(train, steps, per_epoch, processes, result.timing["eval_seconds"]))
    during = samples_during_training(result.timing, periodic_evaluations(train, steps, per_epoch))
    total = ((result.timing["setup_seconds"] or 0.0) + sum(step_seconds)
             + evaluations(config, steps, per_epoch) * (result.timing["eval_seconds"] or 0.0) + during.seconds
             + after.seconds)
    return Estimate(
        seconds_per_step=sum(step_seconds) / steps,
        total_seconds=total,
        peak_rss_mb=peak_rss_mb,
        steps=steps,
        padded_tokens_per_step=sum(tokens) / steps,
        probe_steps=probe_steps,
        precision=result.precision,
        processes=processes,
        peak_gpu_mb=peak_gpu_mb,
        after=after,
        during=during,
    )


def evaluations(config, steps: int, per_epoch: int) -> int:
    """The evaluations timed apart from the set-up: the periodic ones and the base model's where it comes after
    training (with the adapter off); where it comes before training, the measured set-up holds it."""
    return periodic_evaluations(config.train, steps, per_epoch) + adapter_off_is_base(config)


def periodic_evaluations(train, steps: int, per_epoch: int) -> int:
    """The evaluations in training: every train.eval_every, and a last one after a last step that is not one of
    those."""
    return (math.ceil(steps / per_epoch) if train.eval_every == "epoch"
            else steps // train.eval_every + (steps % train.eval_every > 0))


def samples_during_training(timing: dict, rounds: int) -> SamplesDuringTraining:
    """The run's sample rounds, one at each of its evaluations in training, each as long as the probe's round at its
    own last evaluation; none where the probe answered none (no validation split, or eval.samples_during_training
    0)."""
    if not timing["sample_round_seconds"]:
        return SamplesDuringTraining()
    return SamplesDuringTraining(rounds, rounds * timing["sample_round_answers"],
                                 rounds * timing["sample_round_seconds"][-1])


def best_evaluations(train, steps: int, per_epoch: int, processes: int, eval_seconds: float | None) -> int:
    """1 where the run can end with the weights of a checkpoint before its last step, evaluated once more then: it
    evaluates (eval_seconds measured), keeps the best (train.load_best_at_end) in one process, and an evaluation
    falls on a checkpoint before the last step; else 0."""
    if eval_seconds is None or not train.load_best_at_end or train.save_every is None or processes > 1:
        return 0
    evaluated, saved = (_every(value, steps, per_epoch) for value in (train.eval_every, train.save_every))
    return int(any(step < steps for step in evaluated & saved))


def _every(every: int | str, steps: int, per_epoch: int) -> set[int]:
    """The steps that an every-N-steps (or every-epoch) setting falls on."""
    interval = per_epoch if every == "epoch" else every
    return set(range(interval, steps + 1, interval))


def after_last_step(config, result, best: int) -> AfterLastStep:
    """The probe's own work after its last step (the run's sample prompts, test rows and validation pairs), with
    `best` more validation evaluations."""
    timing, test, preference = result.timing, result.test or {}, result.preference or {}
    return AfterLastStep(
        best_evaluations=best, best_seconds=best * (timing["eval_seconds"] or 0.0),
        sample_answers=len(result.samples) * (2 if adapter_off_is_base(config) else 1),
        samples_seconds=timing["samples_seconds"],
        test_rows=test.get("rows", 0), test_answers=test.get("samples", 0), test_seconds=timing["test_seconds"],
        validation_rows=preference.get("pairs", preference.get("rows", 0)), pairs_seconds=timing["pairs_seconds"])


def _largest_process_peaks_mb() -> tuple[float, float | None]:
    """(peak RSS, peak GPU memory PyTorch reserved or None without CUDA), each the largest over the processes: under
    FSDP or DeepSpeed (`accelerate launch`) that is the sharded run's own, measured."""
    cuda = torch.cuda.is_available()
    peaks = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          torch.cuda.max_memory_reserved() / 2**20 if cuda else 0.0],
                         dtype=torch.float64, device="cuda" if cuda else "cpu")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    rss, gpu = peaks.tolist()
    return rss, gpu if cuda else None


def optimizer_steps(train, batches: int, grad_accum: int) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the run) as transformers counts them: an epoch's last step takes the
    batches that are left; train.max_steps, or the epochs' share of the steps, rounded up."""
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    return per_epoch, train.max_steps or math.ceil(train.num_epochs * per_epoch)


def kto_step_padded_tokens(prompts: list[list[int]], answers: list[list[int]], batch_size: int, grad_accum: int,
                           steps: int, max_length: int, processes: int = 1) -> list[int]:
    """Padded tokens of each KTO step in a process (of several, the busiest): batches of batch_size consecutive
    examples (KTO samples in order; an epoch's partial last batch, and its partial last round of batches over the
    processes, are dropped), grad_accum of them a step (an epoch's last step takes what is left), each padded
    to its longest row, and its KL batch: every prompt with the answer of the row before it (the first with the
    last's), padded the same way and cut to max_length as training cuts it."""
    if len(prompts) < batch_size:
        raise ConfigError([f"{len(prompts)} KTO training examples fill no batch of train.batch_size={batch_size}"])
    per_batch = []
    for start in range(0, len(prompts) - batch_size + 1, batch_size):
        batch_prompts, batch_answers = prompts[start : start + batch_size], answers[start : start + batch_size]
        kl_answers = batch_answers[-1:] + batch_answers[:-1]
        per_batch.append(sum(batch_size * min(max(len(p) + len(a) for p, a in zip(batch_prompts, shown)), max_length)
                             for shown in (batch_answers, kl_answers)))
    per_batch = per_batch[: len(per_batch) // processes * processes]
    if not per_batch:
        raise ConfigError([f"{len(prompts)} KTO training examples fill no batch of train.batch_size={batch_size} in "
                           f"each of {processes} processes"])
    epoch = busiest_process_steps(per_batch, grad_accum, processes)
    return (epoch * math.ceil(steps / len(epoch)))[:steps]


def _prepared_train(config):
    unpacked = config.model_copy(update={"data": config.data.model_copy(update={"packing": False})})
    return prepare(unpacked).train


def _kto_examples(config) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt and answer ids of a KTO run's training examples, in the order it draws them."""
    examples = unpaired(_prepared_train(config), config.seed)
    return list(examples["prompt_ids"]), list(examples["completion_ids"])


def _train_lengths(config) -> list[int]:
    """The lengths of the rows training draws its batches from: packed rows where data.packing packs them."""
    if config.data.packing:
        return [len(ids) for ids in prepare(config).train["input_ids"]]
    train = _prepared_train(config)
    if config.method != "sft":
        return pair_lengths(train)
    return [len(ids) for ids in train["input_ids"]]
