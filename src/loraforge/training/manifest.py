"""manifest.json: what a run ran on and with, so it can be reproduced and compared."""

import json
import os
import platform
import resource
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from loraforge import rundir
from loraforge.data.cache import data_file_digest

PACKAGES = ("loraforge", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "safetensors", "tokenizers")


def package_versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = names[0] if names else None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def peak_memory_mb() -> dict:
    import torch

    out = {"process_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def data_fingerprints(sources) -> dict:
    return {s.path: (data_file_digest(Path(s.path)) if Path(s.path).is_file() else f"hub:{s.path}") for s in sources}


def where_from(config) -> dict:
    """The data files a run reads, and the folder it runs in, where the relative paths of its config (model.name,
    data_files) start."""
    return {"data_files": data_fingerprints(config.data.sources), "cwd": os.getcwd()}


def write_start(run_dir: Path, config, precision: dict) -> Path:
    """manifest.json as a run starts or resumes, in place of what an earlier session of it wrote: `where_from` and
    the precision it trains in, so that a run stopped before write_manifest completes the file (once its weights
    are written, say) is read from any folder, and computed, as it trained."""
    return _write(Path(run_dir) / rundir.MANIFEST, {**where_from(config), "precision": precision})


def write_manifest(path: Path, config, fingerprints: dict, trainable: int, wall_seconds: float, **extra) -> Path:
    return _write(path, {
        "versions": package_versions(),
        "git_sha": git_sha(),
        "hardware": hardware(),
        "seed": config.seed,
        **where_from(config),
        "fingerprints": fingerprints,
        "trainable_parameters": trainable,
        "wall_seconds": round(wall_seconds, 2),
        "peak_memory": peak_memory_mb(),
        **extra,
    })


def _write(path: Path, manifest: dict) -> Path:
    """Whole or not at all: a reader, or a run stopped while it writes, never finds the file half written."""
    path = Path(path)
    staged = path.with_name(rundir.MANIFEST_STAGED)
    staged.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, path)
    return path
