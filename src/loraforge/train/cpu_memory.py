"""Process settings that stop a CPU run's memory from growing with each new batch shape.

Batches of variable length give the kernels a new shape at almost every step, and two things then keep
memory that the next step does not reuse (measured on the default run, bench/results):

- glibc serves a request above its mmap threshold with its own mapping, unmapped on free, but raises the
  threshold to the size of each such block freed (up to 32 MiB). Activation buffers then come from the
  heap, where freed buffers of mixed sizes fragment it and stay in the process: about 120 MB of peak RSS.
  A fixed threshold stops the raising; at 1 MiB steps are as fast, while 64 KiB made them ~60% slower.
- ideep, between PyTorch and oneDNN, keeps a computation cache of up to LRU_CACHE_CAPACITY (1024) entries
  per shape of each bf16 matmul: about 8 MB per new sequence length for SmolLM2-135M with its backward,
  170 MB of peak RSS over 20 steps. oneDNN's own primitive cache, which is what makes a seen shape fast,
  is left as it is; with ideep's capacity at 1 steps are as fast. PyTorch reads the variable at its first
  bf16 matmul, so this only takes effect before that; a value the user set is kept.
"""

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
IDEEP_CACHE_VARIABLE = "LRU_CACHE_CAPACITY"


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold; False where the C library is not glibc or refuses it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


def cap_ideep_cache(capacity: int = 1) -> str:
    """Ask ideep for a small computation cache unless the environment already sets one; the value in effect."""
    return os.environ.setdefault(IDEEP_CACHE_VARIABLE, str(capacity))


def limit_memory_growth() -> None:
    threshold = fix_mmap_threshold()
    capacity = cap_ideep_cache()
    log.debug("CPU memory: malloc mmap threshold %s, %s=%s",
              f"{MMAP_THRESHOLD_BYTES} bytes" if threshold else "unchanged", IDEEP_CACHE_VARIABLE, capacity)
