"""How the OpenMP threads of a CPU training run wait between kernels.

A training step on CPU is thousands of short parallel kernels (a small model's matrix products, the elementwise
ops between them), each run by torch's OpenMP threads. GNU OpenMP lets a thread that has finished one spin for a
while and then sleep; woken for the next kernel, it starts late. Told to keep spinning (OMP_WAIT_POLICY=ACTIVE),
the threads start every kernel at once: the default config in fp32 on a 2-core Intel Xeon without AVX512-BF16 trained
about 11% more tokens per second (6 pairs of 10-step runs in turn, README, Benchmarks), and with OMP_WAIT_POLICY=PASSIVE
(never spin) about 30% fewer; on a 2-core AMD EPYC with native bf16 spinning and sleeping were level within the
machine's noise, in bf16 and fp32. The cost is a core kept busy between kernels, which a training process does not give
to anything else; chat and serve, idle between requests, keep the library's default.

libgomp reads the variable once, as it is loaded with torch, so this must run before torch is imported. A value the
user set (OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept. A machine with a GPU keeps the default (there the CPU threads
would spin beside the GPU's work for the whole run), and so does a run of several processes (spinning threads would
hold the cores their collectives need while a process waits for the others).
"""

import glob
import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"
SPIN_COUNT = "GOMP_SPINCOUNT"
GPU_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_present() -> bool:
    """A GPU device node (NVIDIA, AMD ROCm, or a WSL GPU) is there; read without importing torch."""
    return any(glob.glob(pattern) for pattern in GPU_DEVICES)


def spin_between_kernels(processes: int = 1, environ=os.environ) -> str | None:
    """Ask OpenMP threads to spin between kernels unless torch is loaded already (too late to matter), the user chose
    how they wait, the run has several processes (`processes`, or a torchrun process) or the machine has a GPU.
    Returns the wait policy in effect, None for the library's default."""
    if ("torch" in sys.modules or WAIT_POLICY in environ or SPIN_COUNT in environ or processes > 1
            or "LOCAL_RANK" in environ or gpu_present()):
        return environ.get(WAIT_POLICY)
    environ[WAIT_POLICY] = "ACTIVE"
    return "ACTIVE"
