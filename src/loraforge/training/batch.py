"""The global batch: examples per pass x micro-batches accumulated x processes, and the accumulation that
train.global_batch asks for at a process count."""

import os

from loraforge.errors import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation(train, processes: int) -> int:
    """Micro-batches accumulated per optimizer step: train.grad_accum, or what train.global_batch needs."""
    if train.global_batch is None:
        return train.grad_accum
    per_pass = train.batch_size * processes
    if train.global_batch % per_pass:
        raise ConfigError([f"train.global_batch: {train.global_batch} is not a multiple of train.batch_size "
                           f"{train.batch_size} x {processes} process(es) = {per_pass}; change one of them"])
    return train.global_batch // per_pass


def epoch_batches(train, processes: int, examples: int, drop_last: bool) -> int:
    """Micro-batches each process takes in an epoch of `examples` training examples."""
    per_pass = train.batch_size * processes
    return max(examples // per_pass if drop_last else -(-examples // per_pass), 1)


def describe_batch(train, processes: int, examples: int, drop_last: bool = False) -> str:
    """What an optimizer step takes. transformers (5.23) ends each epoch's last step at the epoch's end, so where
    more micro-batches are accumulated than an epoch holds, every step takes one epoch."""
    steps = min(accumulation(train, processes), epoch_batches(train, processes, examples, drop_last))
    taken = min(train.batch_size * steps * processes, examples)
    return (f"global batch: {train.batch_size} per pass x {steps} accumulated x {processes} process(es) = "
            f"{taken} examples per optimizer step")


def short_epoch(train, processes: int, examples: int, drop_last: bool = False) -> str | None:
    """Why a step takes less than the accumulation asked, and what to lower; None where it takes all of it."""
    steps, held = accumulation(train, processes), epoch_batches(train, processes, examples, drop_last)
    if steps <= held:
        return None
    key, most = (("train.global_batch", held * train.batch_size * processes) if train.global_batch is not None
                 else ("train.grad_accum", held))
    return (f"{key}: {steps} micro-batches accumulated per step, but an epoch of {examples} training examples holds "
            f"{held} of {train.batch_size} per process, so each optimizer step takes one epoch; set {key} to {most} "
            "or less, or lower train.batch_size, to say what a step takes")
