"""CPU memory settings, each checked in a fresh process: glibc's and ideep's state is per process and set once."""

import os
import subprocess
import sys
import textwrap

import pytest

from loraforge.train.cpu_memory import KERNEL_CACHES
from tests.conftest import ROOT, write_jsonl

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"

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

GROWTH_OVER_BF16_SHAPES = MALLINFO + """
import torch
layer = torch.nn.Linear(576, 1536).to(torch.bfloat16)
def allocated():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
before = allocated()
for length in range(40, 80):
    x = torch.randn(length, 576, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
print("RESULT", allocated() - before)
"""


def run_python(setup: str, probe: str) -> int:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(setup) + probe], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k not in KERNEL_CACHES})
    assert done.returncode == 0, done.stderr[-2000:]
    return int(next(line for line in done.stdout.splitlines() if line.startswith("RESULT")).split()[1])


def test_without_the_fix_glibc_serves_4_mib_from_the_heap_after_a_16_mib_free():
    assert run_python("", MMAPPED_AFTER_A_BIG_FREE) == 0


def test_fixed_threshold_keeps_4_mib_blocks_mmapped():
    setup = "from loraforge.train.cpu_memory import fix_mmap_threshold\nassert fix_mmap_threshold()\n"
    assert run_python(setup, MMAPPED_AFTER_A_BIG_FREE) >= 4 << 20


def test_capped_ideep_cache_keeps_less_per_new_bf16_shape():
    grown = run_python("", GROWTH_OVER_BF16_SHAPES)
    capped = run_python("from loraforge.train.cpu_memory import cap_kernel_caches\n"
                        "cap_kernel_caches({'LRU_CACHE_CAPACITY': 1})\n", GROWTH_OVER_BF16_SHAPES)
    assert grown - capped > 20 << 20, (grown, capped)


def test_capped_onednn_cache_keeps_less_per_new_bf16_shape():
    ideep_only = run_python("from loraforge.train.cpu_memory import cap_kernel_caches\n"
                            "cap_kernel_caches({'LRU_CACHE_CAPACITY': 1})\n", GROWTH_OVER_BF16_SHAPES)
    both = run_python("import torch\nfrom loraforge.train.cpu_memory import cap_kernel_caches\n"
                      "cap_kernel_caches({'LRU_CACHE_CAPACITY': 1, 'ONEDNN_PRIMITIVE_CACHE_CAPACITY': 8})\n",
                      GROWTH_OVER_BF16_SHAPES)
    assert ideep_only - both > 20 << 20, (ideep_only, both)


def test_a_value_the_user_set_is_kept(monkeypatch):
    from loraforge.train.cpu_memory import cap_kernel_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "restored after the test")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert cap_kernel_caches() == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}


def test_a_cpu_training_run_applies_both(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["one", "two", "three", "four", "five", "six", "seven", "eight"]]
    data = write_jsonl(tmp_path / "say.jsonl", rows)
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.name={tiny_model_dir}",
                 f"data.sources=[{{path: {data}, format: messages}}]", "data.val_fraction=0.25", "train.max_steps=2",
                 "train.batch_size=2", "train.eval_every=100", "eval.num_samples=0", "eval.samples_during_training=0",
                 "report_to=[]"]
    setup = f"""
    import os
    from loraforge.config import load_config
    from loraforge.train.recipe import run_training
    run_training(load_config({str(DEFAULT_CONFIG)!r}, {overrides!r}))
    assert os.environ["LRU_CACHE_CAPACITY"] == "1" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    """
    assert run_python(setup, MMAPPED_AFTER_A_BIG_FREE) >= 4 << 20
