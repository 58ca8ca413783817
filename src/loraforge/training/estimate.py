"""`loraforge estimate`: seconds per step, total time and peak memory of a config, before the long run
(SFT or a preference method: a DPO step computes both answers of each pair and a reference pass, a KTO step each
example and its KL example, all in the probe's times).

A few real optimizer steps of the config give the peak memory, a fixed cost per step and the seconds per
padded token (fitted on all but the first step), and the first step's extra time (a warm-up, counted once).
The config's own batches, built from the tokenized data in the order training draws them, give the padded
tokens of each step of the run; the step times follow from the fit.

With several processes (`--nproc N`, launched through torchrun like `train`) the probe is a real N-process run:
its steps are timed and its memory taken per process, the largest process's peak reported. The processes take
the batches in turn, and a step lasts as long as its slowest process: each step counts the padded tokens of the
process that computes the most in it.
"""

import math
import resource
import shutil
import tempfile
from dataclasses import dataclass

import torch

from loraforge.errors import ConfigError
from loraforge.training.batch import accumulation, world_size
from loraforge.training.build import unpaired
from loraforge.training.prepare import prepare
from loraforge.training.run import run_training
from loraforge.training.trainer import length_grouped_order, pair_lengths


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

    def summary(self) -> str:
        total = (f"{self.total_seconds:.0f} seconds" if self.total_seconds < 120 else
                 f"{self.total_seconds / 60:.1f} minutes")
        where = "on this machine" if self.processes == 1 else f"in {self.processes} processes on this machine"
        per = "" if self.processes == 1 else " per process"
        largest = "" if self.processes == 1 else " (the largest process)"
        return (
            f"Estimate from {self.probe_steps} measured steps {where}, in {self.precision}:\n"
            f"  {self.seconds_per_step:.2f} s per optimizer step ({self.padded_tokens_per_step:.0f} padded tokens per "
            f"step{per})\n"
            f"  {self.steps} steps: about {total} in all, evaluations and model loading included (not the "
            "few seconds Python takes to start)\n"
            f"  peak memory: {self.peak_rss_mb:.0f} MB process RSS{largest}"
            + ("" if self.peak_gpu_mb is None else
               f"\n  peak GPU memory: {self.peak_gpu_mb:.0f} MB reserved by PyTorch{largest}")
        )


def step_padded_tokens(lengths: list[int], batch_size: int, grad_accum: int, group_by_length: bool,
                       packed: bool, seed: int, steps: int, processes: int = 1) -> list[float]:
    """Padded tokens each of the run's optimizer steps computes in a process (of several, the busiest): under
    length grouping the very batches training draws, epoch after epoch; in a random order or packed, the mean
    over an epoch for every step."""
    if packed or not group_by_length:
        if packed:
            per_batch = [sum(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)]
        else:
            generator = torch.Generator()
            generator.manual_seed(seed)
            order = torch.randperm(len(lengths), generator=generator).tolist()
            per_batch = [batch_size * max(lengths[i] for i in order[k : k + batch_size])
                         for k in range(0, len(order), batch_size)]
        return [grad_accum * sum(per_batch) / len(per_batch)] * steps
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
        "eval": config.eval.model_copy(update={"num_samples": 0, "samples_during_training": 0, "sample_prompts": []}),
        "report_to": [],
    })
    try:
        result = run_training(probe)
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
    total = ((result.timing["setup_seconds"] or 0.0) + sum(step_seconds)
             + evaluations(train, steps, per_epoch) * (result.timing["eval_seconds"] or 0.0))
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
    )


def evaluations(train, steps: int, per_epoch: int) -> int:
    """The base model's evaluation, then the periodic ones, and a last one after a last step that is not one of
    those."""
    if train.eval_every == "epoch":
        return 1 + math.ceil(steps / per_epoch)
    return 1 + steps // train.eval_every + (steps % train.eval_every > 0)


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
