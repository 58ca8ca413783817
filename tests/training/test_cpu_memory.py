"""CPU memory settings, each checked in a fresh process: glibc's and ideep's state is per process and set once."""

import functools
import os
import subprocess
import sys
import textwrap

import pytest

from loraforge.training.cpu_memory import KERNEL_CACHES

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


MALLINFO = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
"""

MMAPPED_AFTER_A_BIG_FREE = MALLINFO + """
libc.free(libc.malloc(16 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print("RESULT", libc.mallinfo2().hblkhd - before)
libc.free(block)
"""

MMAPPED_FIRST_BIG_BLOCK = MALLINFO + """
before = libc.mallinfo2().hblkhd
block = libc.malloc(4 << 20)
print("RESULT", libc.mallinfo2().hblkhd - before)
libc.free(block)
"""

GROWTH_OVER_BF16_SHAPES = MALLINFO + """
import torch
layer = torch.nn.Linear(576, 1536).to(torch.bfloat16)
def allocated():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
before = allocated()
for length in LENGTHS:
    x = torch.randn(length, 576, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
print("RESULT", allocated() - before)
"""
NEW_SHAPES = "LENGTHS = range(40, 80)\n"
ONE_SHAPE = "LENGTHS = [60] * 40\n"
# Two runs of the same probe differ by a few KiB; growth under this is no effect to fix.
MEASURABLE = 1 << 20


@functools.cache  # both cap tests measure the ideep-capped growth; once is enough
def per_shape_growth(setup: str) -> int:
    """Heap growth over 40 new bf16 shapes beyond that over one shape 40 times: what each new shape keeps."""
    return run_python(setup + NEW_SHAPES, GROWTH_OVER_BF16_SHAPES) - run_python(setup + ONE_SHAPE, GROWTH_OVER_BF16_SHAPES)


def require_effect(growth: int, what: str) -> None:
    if growth < MEASURABLE:
        pytest.skip(f"{what} keeps no measurable memory per new bf16 shape on this CPU ({growth / 2**20:.2f} MiB "
                    f"over 40 shapes): nothing for its cap to remove here")


def without_an_mmap_threshold(environ) -> dict:
    """The environment less the kernel caches and any mmap threshold given to glibc (other glibc tunables stay)."""
    kept = {k: v for k, v in environ.items() if k not in KERNEL_CACHES and k != "MALLOC_MMAP_THRESHOLD_"}
    tunables = [t for t in kept.pop("GLIBC_TUNABLES", "").split(":") if t and t.partition("=")[0] != "glibc.malloc.mmap_threshold"]
    return {**kept, **({"GLIBC_TUNABLES": ":".join(tunables)} if tunables else {})}


def run_python(setup: str, probe: str, **environ: str) -> int:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(setup) + probe], capture_output=True, text=True,
                          timeout=300, env={**without_an_mmap_threshold(os.environ), **environ})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()[1])


def test_without_the_fix_glibc_serves_4_mib_from_the_heap_after_a_16_mib_free():
    assert run_python("", MMAPPED_AFTER_A_BIG_FREE) == 0


def test_fixed_threshold_keeps_4_mib_blocks_mmapped():
    setup = "from loraforge.training.cpu_memory import fix_mmap_threshold\nassert fix_mmap_threshold()\n"
    assert run_python(setup, MMAPPED_AFTER_A_BIG_FREE) >= 4 << 20


IDEEP_CAP = "from loraforge.training.cpu_memory import cap_kernel_caches\ncap_kernel_caches({'LRU_CACHE_CAPACITY': 1})\n"
# 8, not the product's 256: 40 shapes make fewer than 256 primitives, so only a small cap shows the effect here.
BOTH_CAPS = ("from loraforge.training.cpu_memory import cap_kernel_caches\n"
             "cap_kernel_caches({'LRU_CACHE_CAPACITY': 1, 'ONEDNN_PRIMITIVE_CACHE_CAPACITY': 8})\n")


def test_capped_ideep_cache_removes_a_clear_share_of_the_per_shape_growth():
    grown = per_shape_growth("")
    require_effect(grown, "ideep with oneDNN")
    capped = per_shape_growth(IDEEP_CAP)
    assert capped <= 0.75 * grown, (grown, capped)


def test_capped_onednn_cache_removes_most_of_what_ideep_leaves():
    grown = per_shape_growth(IDEEP_CAP)
    require_effect(grown, "oneDNN's primitive cache")
    capped = per_shape_growth(BOTH_CAPS)
    assert capped <= 0.5 * grown, (grown, capped)


def test_a_value_the_user_set_is_kept(monkeypatch):
    from loraforge.training.cpu_memory import cap_kernel_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "restored after the test")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert cap_kernel_caches() == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}


def test_the_cli_applies_both_before_a_command_runs(tmp_path):
    setup = f"""
    import os
    from loraforge.cli import main
    assert main(["chat", {str(tmp_path / "no-run")!r}]) == 2
    assert os.environ["LRU_CACHE_CAPACITY"] == "1" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    """
    assert run_python(setup, MMAPPED_AFTER_A_BIG_FREE) >= 4 << 20


@pytest.mark.parametrize("environ", [{"MALLOC_MMAP_THRESHOLD_": str(32 << 20)},
                                     {"GLIBC_TUNABLES": f"glibc.malloc.trim_threshold={1 << 30}:glibc.malloc.mmap_threshold={32 << 20}"}],
                         ids=["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_the_cli_keeps_an_mmap_threshold_the_user_gave_glibc(tmp_path, environ):
    # 32 MiB, fixed by the user: glibc serves a first 4 MiB block from the heap, where its own 128 KiB start (had it
    # ignored the setting) and loraforge's 1 MiB (had loraforge replaced it) would both mmap it.
    setup = f"""
    from loraforge.cli import main
    assert main(["chat", {str(tmp_path / "no-run")!r}]) == 2
    """
    assert run_python("", MMAPPED_FIRST_BIG_BLOCK) >= 4 << 20
    assert run_python(setup, MMAPPED_FIRST_BIG_BLOCK, **environ) == 0


@pytest.mark.parametrize(("environ", "kept"), [
    ({}, None),
    ({"MALLOC_MMAP_THRESHOLD_": "262144"}, "262144"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1:glibc.malloc.mmap_threshold=0x40000"}, "0x40000"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096", "MALLOC_MMAP_THRESHOLD_": "262144"}, "4096"),
    ({"MALLOC_MMAP_THRESHOLD_": ""}, None),
    ({"MALLOC_MMAP_THRESHOLD_": "1M"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0 glibc.malloc.mmap_threshold=1048576"}, None),
])
def test_a_threshold_counts_as_the_users_only_where_glibc_takes_it_as_given(environ, kept):
    # glibc reads GLIBC_TUNABLES before the old variable, splits it on ':' alone, and the last entry wins; an empty or
    # non-numeric value it takes as 0 (every block mapped), which loraforge's 1 MiB replaces.
    from loraforge.training.cpu_memory import user_mmap_threshold

    assert user_mmap_threshold(environ) == kept


def test_a_command_that_computes_nothing_changes_no_setting():
    setup = """
    import os
    from loraforge.cli import main
    assert main(["config", "schema"]) == 0
    assert "LRU_CACHE_CAPACITY" not in os.environ
    """
    assert run_python(setup, MMAPPED_AFTER_A_BIG_FREE) == 0
