"""Keys for the trackers from a `.env` file beside the config (WANDB_API_KEY, MLFLOW_TRACKING_URI, ...).

The values go into the process environment, where wandb and mlflow read them; a variable already set wins.
Nothing here logs or records a value: only how many were read.
"""

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from dotenv import dotenv_values

log = logging.getLogger(__name__)

ENV_FILE = ".env"


def env_beside(config_path: str | Path) -> dict[str, str]:
    """The variables of CONFIG_DIR/.env that the environment does not already have."""
    path = Path(config_path).parent / ENV_FILE
    if not path.is_file():
        return {}
    values = {name: value for name, value in dotenv_values(path).items() if value is not None}
    added = {name: value for name, value in values.items() if name not in os.environ}
    log.info("%s: %d variable(s) read for the trackers (values are never logged)", path, len(added))
    return added


def read_env_beside(config_path: str | Path) -> list[str]:
    """Set the variables of CONFIG_DIR/.env that the environment does not already have, for the rest of the
    process (a command); their names."""
    added = env_beside(config_path)
    os.environ.update(added)
    return list(added)


@contextmanager
def scoped_environment(values: dict[str, str]):
    """The variables set for the body (a run, where trackers read them), then put back as they were."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
