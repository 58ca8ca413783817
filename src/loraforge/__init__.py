"""Fine-tune causal language models with LoRA from one validated YAML config.

`loraforge.load_config`, `train`, `evaluate`, `merge` and `generate` are the Python API (loraforge/api.py);
they load on first use, so `import loraforge` stays instant and the command line starts fast.
"""

import logging
import os

__version__ = "0.1.0"

# Telemetry none, for the command line and the Python API alike: set before huggingface_hub reads it at its import.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

API = ("EvalResult", "MergeResult", "TrainResult", "evaluate", "generate", "load_config", "merge", "train")
__all__ = list(API)


def __getattr__(name: str):
    if name == "load_config":
        from loraforge.config import load_config

        return load_config
    if name in API:
        # As the command line: bitsandbytes warns at import of a CPU kernel from the hub that loraforge never uses.
        if logging.getLogger("bitsandbytes").level == logging.NOTSET:
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        from loraforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API])
