"""The run directory: what a run writes, where, and how later commands read it back."""

from pathlib import Path

from loraforge.errors import RunDirError

RESOLVED = "resolved.yaml"
ADAPTER = "adapter"
MODEL = "model"
MERGED = "merged"
EXPORT = "export"
REPORT = "report.md"
LABELS = "labels.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
LOG = "train.log"
EVAL = "eval.json"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TENSORBOARD = "tensorboard"


def ensure_free(output_dir: str | Path) -> Path:
    """Refuse a directory that already holds a run, so nothing is overwritten."""
    run_dir = Path(output_dir)
    if (run_dir / RESOLVED).exists():
        raise RunDirError(
            f"{run_dir} already holds a run ({RESOLVED} is there); set output_dir to a new directory "
            f"(for example output_dir={run_dir}-2) or delete the old one"
        )
    return run_dir


def create(output_dir: str | Path) -> Path:
    run_dir = ensure_free(output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_config(run_dir: str | Path):
    from loraforge.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / RESOLVED).is_file():
        raise RunDirError(f"{run_dir} is not a run directory: {RESOLVED} is missing; pass the output_dir of a training run")
    if not (run_dir / ADAPTER / "adapter_config.json").is_file() and not (run_dir / MODEL / "config.json").is_file():
        raise RunDirError(
            f"{run_dir} has no finished adapter ({ADAPTER}/adapter_config.json) or model ({MODEL}/config.json); "
            "the run did not complete"
        )
    return load_config(run_dir / RESOLVED)
