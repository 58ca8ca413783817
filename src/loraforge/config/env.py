"""Keys for the trackers from a `.env` file beside the config (WANDB_API_KEY, MLFLOW_TRACKING_URI, ...).

The values go into the process environment, where wandb and mlflow read them; a variable already set wins.
Nothing here logs or records a value: only how many were read.
"""

import logging
import os
from pathlib import Path

from dotenv import dotenv_values

log = logging.getLogger(__name__)

ENV_FILE = ".env"


def read_env_beside(config_path: str | Path) -> list[str]:
    """Set the variables of CONFIG_DIR/.env that the environment does not already have; their names."""
    path = Path(config_path).parent / ENV_FILE
    if not path.is_file():
        return []
    values = {name: value for name, value in dotenv_values(path).items() if value is not None}
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    log.info("%s: %d variable(s) read for the trackers (values are never logged)", path, len(added))
    return added
