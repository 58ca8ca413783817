"""Trackers checked before a run directory is claimed: one that cannot start would otherwise fail with a traceback
in the trainer's first callback, after the run's first files are written."""

import os
from importlib.util import find_spec

from loraforge.errors import ConfigError

WANDB_OFF = {"offline", "disabled", "dryrun"}


def check_trackers(report_to, prompt: bool = True) -> None:
    """Refuse a tracker that is not installed or cannot log in; prompt: on a terminal, wandb asks for its key."""
    problems = (_wandb(prompt) if "wandb" in report_to else []) + (_mlflow() if "mlflow" in report_to else [])
    if problems:
        raise ConfigError(problems)


def _wandb(prompt: bool = True) -> list[str]:
    if find_spec("wandb") is None:
        return ["report_to: wandb is not installed; pip install wandb, or leave wandb out of report_to"]
    if (os.environ.get("WANDB_MODE", "").lower() in WANDB_OFF
            or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")):
        return []
    import wandb

    try:
        # No server contact (verify=False); on a terminal it asks for the key, as wandb.init would later.
        logged_in, why = wandb.login(verify=False, prompt=prompt), "no API key"
    except Exception as exc:  # wandb raises UsageError without a key, AuthenticationError for a malformed one
        logged_in, why = False, _first_line(exc)
    if not logged_in:
        return [f"report_to: wandb cannot log in ({why}); set WANDB_API_KEY (in the environment or a .env file beside "
                "the config) or run `wandb login`; WANDB_MODE=offline logs to local files instead; or leave wandb out "
                "of report_to"]
    return []


def _mlflow() -> list[str]:
    if find_spec("mlflow") is None:
        return ["report_to: mlflow is not installed; pip install mlflow, or leave mlflow out of report_to"]
    import mlflow

    try:
        mlflow.MlflowClient()
    except Exception as exc:  # mlflow raises its own exception per unsupported or unusable store
        return [f"report_to: mlflow cannot open its tracking store {mlflow.get_tracking_uri()!r} "
                f"({_first_line(exc)}); set MLFLOW_TRACKING_URI to your MLflow server (http://host:5000), in the "
                "environment or a .env file beside the config, or leave mlflow out of report_to"]
    return []


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].strip()}" if text else type(exc).__name__
