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


def describe_batch(train, processes: int) -> str:
    steps = accumulation(train, processes)
    return (f"global batch: {train.batch_size} per pass x {steps} accumulated x {processes} process(es) = "
            f"{train.batch_size * steps * processes} examples per optimizer step")
