"""Runs many `python -m loraforge` commands from one interpreter that imports the heavy libraries once. Each command
runs in a child forked from it, with its own working directory, stdout, stderr and exit status, as it would from a
shell; the libraries' import (most of each command's time) is paid once instead of once per command.

    python tests/forked_cli.py JOBS.json RESULTS.json

JOBS.json: {name: {"args": [...], "cwd": ..., "stdout": path, "stderr": path}}; RESULTS.json: {name: {"code": int,
"seconds": float}}. A child still running after TIMEOUT_SECONDS is killed and reported with code -9."""

import importlib
import json
import os
import runpy
import signal
import sys
import time
import traceback

TIMEOUT_SECONDS = 300
PRELOADED = ["loraforge.cli", "loraforge.chat", "loraforge.export.merge", "loraforge.preview", "loraforge.training.run"]


def child(job: dict) -> None:
    os.chdir(job["cwd"])
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["loraforge", *job["args"]]
    code = 0
    try:
        runpy.run_module("loraforge", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if isinstance(stop.code, int):
            code = stop.code
        elif stop.code is not None:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_all(jobs: dict, workers: int) -> dict:
    waiting = list(jobs)
    running: dict[int, tuple[str, float]] = {}
    results = {}
    while waiting or running:
        while waiting and len(running) < workers:
            name = waiting.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(jobs[name])
            running[pid] = (name, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for late, (name, began) in running.items():
                if time.monotonic() - began > TIMEOUT_SECONDS:
                    os.kill(late, signal.SIGKILL)
            time.sleep(0.05)
            continue
        name, began = running.pop(pid)
        results[name] = {"code": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - began}
    return results


def main() -> None:
    for module in PRELOADED:
        importlib.import_module(module)

    jobs_file, results_file = sys.argv[1:3]
    jobs = json.loads(open(jobs_file).read())
    results = run_all(jobs, os.cpu_count() or 2)
    with open(results_file, "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()
