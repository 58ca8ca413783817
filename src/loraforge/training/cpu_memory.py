"""Process settings that stop a CPU run's memory from growing with each new batch shape.

Batches of variable length give the kernels a new shape at almost every step, and two things then keep
memory that the next step does not reuse (measured on the default run, bench/results):

- glibc serves a request above its mmap threshold with its own mapping, unmapped on free, but raises the
  threshold to the size of each such block freed (up to 32 MiB). Activation buffers then come from the
  heap, where freed buffers of mixed sizes fragment it and stay in the process: about 120 MB of peak RSS.
  A fixed threshold stops the raising; at 1 MiB steps are as fast, while 64 KiB made them ~60% slower.
  A threshold the user gave glibc (MALLOC_MMAP_THRESHOLD_, or GLIBC_TUNABLES' glibc.malloc.mmap_threshold) is
  kept: a lower one trades speed for memory (README, Memory on CPU).
- Two kernel caches keep per-shape state of each bf16 matmul and its backward. ideep, between PyTorch and
  oneDNN, keeps a computation cache of up to LRU_CACHE_CAPACITY (1024) entries: about 8 MB per new
  sequence length for SmolLM2-135M, 170 MB of peak RSS over the default run's 20 steps; at capacity 1
  steps are as fast. oneDNN's primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024 primitives) is what
  makes a seen shape fast, at about 7 MB per shape: over 100 steps the run grew to 1663 MB with it at
  1024 and stayed at 1331 MB at 256, at the same speed (64 was slower in one run of two).
  Both libraries read their variable once, at the first bf16 matmul, so this takes effect only before
  that; a value the user set is kept.
"""

import ctypes
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
KERNEL_CACHES = {"LRU_CACHE_CAPACITY": 1, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256}


def user_mmap_threshold(environ=os.environ) -> str | None:
    """The mmap threshold the user gave glibc at process start, as glibc reads it: GLIBC_TUNABLES (entries split by
    ':', the last one counting) before MALLOC_MMAP_THRESHOLD_. None where they gave none, or a value that is not a
    number (glibc takes that as 0, mapping every block; loraforge's threshold then replaces it)."""
    tunables = [entry.partition("=") for entry in environ.get("GLIBC_TUNABLES", "").split(":")]
    given = [value for name, sep, value in tunables if name == "glibc.malloc.mmap_threshold" and sep]
    value = given[-1] if given else environ.get("MALLOC_MMAP_THRESHOLD_")
    return value if value is not None and re.fullmatch(r"0[xX][0-9a-fA-F]+|[0-9]+", value) else None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold; False where the C library is not glibc or refuses it, or where the user set one."""
    if not sys.platform.startswith("linux") or user_mmap_threshold() is not None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


def cap_kernel_caches(capacities: dict[str, int] = KERNEL_CACHES) -> dict[str, str]:
    """Ask ideep and oneDNN for smaller caches unless the environment already sets them; the values in effect."""
    return {name: os.environ.setdefault(name, str(value)) for name, value in capacities.items()}


def limit_memory_growth() -> None:
    threshold = fix_mmap_threshold()
    caches = cap_kernel_caches()
    kept = user_mmap_threshold()
    setting = f"{MMAP_THRESHOLD_BYTES} bytes" if threshold else f"{kept} (yours)" if kept is not None else "unchanged"
    log.debug("CPU memory: malloc mmap threshold %s, %s", setting,
              ", ".join(f"{name}={value}" for name, value in caches.items()))
