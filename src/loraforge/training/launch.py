"""Several training processes through torchrun (torch.distributed.run), run in this process so that a process
that fails, or a signal that stops them all, ends in one line naming which process, how it ended, the last
complete checkpoint and the command that resumes: not torchrun's traceback."""

import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import get_args_parser, run

from loraforge.errors import TrainingStopped
from loraforge.training.resume import carry_on


def launch(torchrun_args: list[str], run_dir: Path | None = None, command: list[str] | None = None) -> None:
    """Run torchrun with these arguments; raise TrainingStopped when a process fails or a signal stops them, saying
    where the run's last checkpoint is and how to go on when given a run directory (and the train arguments that
    start the run, as resume_command takes them)."""
    if "--standalone" in torchrun_args and "lo" in {name for _, name in socket.if_nameindex()}:
        # One machine: the processes' collectives talk over loopback, reachable from nowhere else.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # torchrun's per-launch folder of process logs and error files, removed afterwards (else one is left in TMPDIR
    # per launch).
    logs = tempfile.mkdtemp(prefix="loraforge-torchrun-")
    try:
        run(get_args_parser().parse_args(["--log-dir", logs, *torchrun_args]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code == 2:
            raise TrainingStopped(f"process rank {rank} stopped on the error printed above", exit_code=2) from None
        how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        raise TrainingStopped(
            f"process rank {rank} (pid {failure.pid}) {how}; torchrun stopped the other processes on this machine."
            f"{_where(run_dir, command)}",
            exit_code=code if code in (130, 143) else 1,
        ) from None
    except RendezvousError as exc:
        raise TrainingStopped(f"the rendezvous closed ({type(exc).__name__}): the node hosting it, node rank 0, stopped "
                              f"or cannot be reached.{_where(run_dir, command)}", exit_code=1) from None
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        raise TrainingStopped(f"stopped by {name}: torchrun passed it on to every process."
                              f"{_where(run_dir, command)}", exit_code=130 if name == "SIGINT" else 143) from None
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _where(run_dir: Path | None, command: list[str] | None) -> str:
    if run_dir is None:
        return ""
    return f" {carry_on(run_dir, command)}"
