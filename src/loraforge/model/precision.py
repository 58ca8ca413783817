"""Which dtype a run trains in, chosen by what the machine does rather than by what it advertises.

On CPU a flag is not enough: oneDNN runs bf16 on any AVX-512 CPU, emulated where the CPU lacks AVX512-BF16 or
AMX (a 2048² matmul ran 51 GFLOP/s in bf16 against 246 in fp32 on such a Xeon), and even a CPU that reports
AVX512-BF16 can run bf16 matmuls slower than fp32 (an Intel Xeon without AMX here: 165 against 307). So auto
times a short matmul of the model's own shapes in both dtypes and takes bf16 only where it is clearly faster.
"""

import functools
import logging
import os
import time
from dataclasses import dataclass, field

from loraforge.errors import ConfigError

log = logging.getLogger(__name__)

# bf16 also costs casts and a little accuracy (+0.3% eval loss at 40 steps, bench/precision.py): it has to win
# the matmul race by this much to be worth it. On native-bf16 CPUs it wins by ~2x, elsewhere it loses.
BF16_MIN_SPEEDUP = 1.3
PROBE_TOKENS = 256
PROBE_MAX_WIDTH = 2048
PROBE_MIN_WIDTH = 512
PROBE_REPEATS = 5


@dataclass(frozen=True)
class Precision:
    """The dtype chosen for `requested`, why, and the figures it was chosen on."""

    requested: str
    chosen: str
    reason: str
    measured: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"requested": self.requested, "chosen": self.chosen, "reason": self.reason, **self.measured}


def cpu_bf16_features() -> dict[str, bool]:
    """The CPU features that compute bf16 in hardware, as torch reports them (all False off x86 or when unknown)."""
    import torch

    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        capabilities = {}
    return {name: bool(capabilities.get(name, False)) for name in ("avx512_bf16", "amx_bf16")}


@functools.cache
def matmul_gflops(tokens: int, width: int, depth: int, dtype_name: str, repeats: int = PROBE_REPEATS,
                  give_up_below: float = 0.0) -> float:
    """Best-of-`repeats` GFLOP/s of a (tokens x depth) @ (depth x width) product and its transpose, as a
    linear layer's forward and its input-gradient run them. Timing stops early once a repetition after the first
    runs below give_up_below GFLOP/s: a dtype that far behind loses the comparison, and without a fast kernel
    (bf16 on a CPU without AVX-512) its repetitions would take seconds."""
    import torch

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, depth, generator=generator).to(dtype)
    w = torch.randn(width, depth, generator=generator).to(dtype)
    grad = torch.randn(tokens, width, generator=generator).to(dtype)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            started = time.perf_counter()
            torch.nn.functional.linear(x, w)
            grad @ w
            elapsed = time.perf_counter() - started
            if i:
                best = min(best, elapsed)
                if 2 * 2 * tokens * width * depth / elapsed / 1e9 < give_up_below:
                    break
    return 2 * 2 * tokens * width * depth / best / 1e9


def probe_shape(model_config) -> tuple[int, int]:
    """(width, depth) of the model's MLP up-projection, capped so that timing it stays well under a second, and at
    least PROBE_MIN_WIDTH: a tiny test model's product takes microseconds, too short to time either dtype."""
    hidden = getattr(model_config, "hidden_size", None) or 1024
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    return (min(max(intermediate, PROBE_MIN_WIDTH), PROBE_MAX_WIDTH),
            min(max(hidden, PROBE_MIN_WIDTH), PROBE_MAX_WIDTH))


def cpu_speeds(model_config=None) -> dict:
    width, depth = probe_shape(model_config)
    fp32 = matmul_gflops(PROBE_TOKENS, width, depth, "float32")
    bf16 = matmul_gflops(PROBE_TOKENS, width, depth, "bfloat16", give_up_below=fp32 / 2)
    return {
        "probe": f"{PROBE_TOKENS}x{depth} @ {depth}x{width} and back",
        "fp32_gflops": round(fp32, 1),
        "bf16_gflops": round(bf16, 1),
        **cpu_bf16_features(),
    }


def _describe(speeds: dict) -> str:
    flags = [name for name in ("avx512_bf16", "amx_bf16") if speeds.get(name)]
    hardware = f"this CPU has {' and '.join(flags)}" if flags else "no native bf16 on this CPU"
    return f"{hardware} (bf16 {speeds['bf16_gflops']:.0f} vs fp32 {speeds['fp32_gflops']:.0f} GFLOP/s)"


def choose_cpu(requested: str, model_config=None) -> Precision:
    if requested == "fp16":
        raise ConfigError(["precision: fp16 on a CPU runs through a very slow fallback; use fp32 or bf16 (or auto)"])
    if requested == "fp32":
        return Precision(requested, "fp32", "set in the config")
    speeds = cpu_speeds(model_config)
    speedup = speeds["bf16_gflops"] / max(speeds["fp32_gflops"], 0.1)
    faster = speedup >= BF16_MIN_SPEEDUP
    if requested == "bf16":
        if not faster:
            log.warning("precision bf16: bf16 matmuls run at %.2fx the speed of fp32 here, %s; precision: auto "
                        "would train in fp32", speedup, _describe(speeds))
        return Precision(requested, "bf16", "set in the config", speeds)
    chosen = "bf16" if faster else "fp32"
    return Precision(requested, chosen, _describe(speeds), speeds)


def choose_cuda(requested: str) -> Precision:
    import torch

    bf16 = torch.cuda.is_bf16_supported()
    if requested == "auto":
        return Precision(requested, "bf16" if bf16 else "fp16",
                         "the GPU supports bf16" if bf16 else "the GPU has no bf16; fp16 with loss scaling")
    if requested == "bf16" and not bf16:
        raise ConfigError(["precision: bf16 is not supported by this GPU; use fp16 or auto"])
    return Precision(requested, requested, "set in the config")


def join_cpu_processes() -> None:
    """Several CPU processes bring their process group up before the precision is chosen, so that they all take
    rank 0's measured choice (on CUDA every process reads the same answer from its GPU). It is the group HF's
    TrainingArguments would bring up later (gloo, as `PartialState(cpu=True)`), which then finds it up."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        from accelerate import PartialState

        PartialState(cpu=True)


def shared_by_every_process(choice: Precision) -> Precision:
    """Process rank 0's choice, in every process of a run whose process group is up. Each process times its own
    probe, on cores its peers share, and measured choices differed between two processes of one run; processes
    holding the model in different dtypes then wait for each other forever at their first collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    shared = [choice]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def choose_precision(requested: str, model_config=None) -> Precision:
    """The dtype to train in on this machine; model_config (its hidden and intermediate sizes) shapes the probe.
    Under several processes with their process group up, every process takes process rank 0's choice.

    On CPU the probe runs a bf16 matmul, which fixes oneDNN's cache sizes for the process: apply the CPU memory
    settings before calling this."""
    import torch

    choice = choose_cuda(requested) if torch.cuda.is_available() else choose_cpu(requested, model_config)
    choice = shared_by_every_process(choice)
    if requested == "auto":
        log.info("precision auto -> %s: %s", choice.chosen, choice.reason)
    return choice


def choose_for_run(trained: str | None, model_config=None, cuda: bool = False) -> Precision:
    """The dtype chat and serve compute a finished run in on this machine: bf16 where the run trained in it
    (manifest.json) and precision auto would choose it here, else fp32 (bf16 emulated here, or a run trained in
    fp32, in fp16, or with no manifest). cuda: the model computes on the GPU (bitsandbytes put it there)."""
    if trained != "bf16":
        why = f"the run trained in {trained}" if trained else "no manifest.json says what the run trained in"
        return Precision("as trained", "fp32", "as the run trained" if trained == "fp32" else why)
    here = choose_cuda("auto") if cuda else choose_cpu("auto", model_config)
    if here.chosen == "bf16":
        return Precision("as trained", "bf16", f"as the run trained: {here.reason}", here.measured)
    slow = "this GPU has no bf16" if cuda else here.reason
    return Precision("as trained", "fp32", f"the run trained in bf16, but {slow}", here.measured)
