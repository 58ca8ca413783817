"""How OpenMP threads wait, read back from libgomp itself as torch loads it (OMP_DISPLAY_ENV), in a fresh process:
libgomp reads its environment once, when it is loaded."""

import os
import subprocess
import sys
import textwrap

from loraforge.training.cpu_threads import SPIN_COUNT, WAIT_POLICY, gpu_present, spin_between_kernels

SPINNING = "OMP_WAIT_POLICY = 'ACTIVE'"
# What libgomp displays when nothing asks it to spin: its default spins a little, then sleeps.
DEFAULT = "OMP_WAIT_POLICY = 'PASSIVE'"


def libgomp_says(command: list[str], cwd, **environ) -> str:
    """libgomp's wait policy after `loraforge COMMAND` ran in a fresh process, with `environ` added."""
    script = textwrap.dedent(f"""
        from loraforge.cli import main
        assert main({command!r}) == 2
        """)
    env = {k: v for k, v in os.environ.items() if k not in (WAIT_POLICY, SPIN_COUNT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**env, "OMP_DISPLAY_ENV": "true", **environ})
    assert done.returncode == 0, done.stderr[-3000:]
    return next(line.strip() for line in done.stderr.splitlines() if line.strip().startswith("OMP_WAIT_POLICY ="))


def test_train_and_estimate_have_their_threads_spin_between_kernels_where_there_is_no_gpu(tmp_path):
    expected = DEFAULT if gpu_present() else SPINNING
    assert libgomp_says(["train", "missing.yaml"], tmp_path) == expected
    assert libgomp_says(["estimate", "missing.yaml"], tmp_path) == expected


def test_a_run_of_several_processes_keeps_the_library_default(tmp_path):
    assert libgomp_says(["train", "missing.yaml", "--nproc", "2"], tmp_path) == DEFAULT
    assert libgomp_says(["train", "missing.yaml"], tmp_path, LOCAL_RANK="0") == DEFAULT


def test_chat_waiting_for_a_prompt_keeps_the_library_default(tmp_path):
    assert libgomp_says(["chat", str(tmp_path / "no-run")], tmp_path) == DEFAULT


def test_how_the_user_asked_threads_to_wait_is_kept(tmp_path):
    assert libgomp_says(["train", "missing.yaml"], tmp_path, OMP_WAIT_POLICY="PASSIVE") == DEFAULT
    assert libgomp_says(["train", "missing.yaml"], tmp_path, GOMP_SPINCOUNT="1000") == DEFAULT


def test_nothing_is_set_once_torch_is_loaded():
    import torch  # noqa: F401  (loaded, as in a notebook that imported it before loraforge)

    environ = {}
    assert spin_between_kernels(environ=environ) is None and environ == {}
