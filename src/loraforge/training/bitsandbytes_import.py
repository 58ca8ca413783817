"""Whether a training process imports bitsandbytes.

peft imports bitsandbytes whenever it is installed, and bitsandbytes 0.50 wraps its CPU kernels in `torch.compile`
as it is imported, which loads Inductor and networkx: about 44 MB of memory for the whole run (README, fp32 ... what
was tried). A run whose base is not quantized and whose optimizer is torch's never calls it, so `train`, `estimate`
and the commands that load finished runs (chat, serve, eval, merge, export, predict) mark it as absent (None in
`sys.modules`, Python's way to refuse an import) before the training libraries are imported; peft, transformers
and accelerate ask `importlib.util.find_spec`, which then answers that it is not installed. The mark holds for the
rest of the process, so it is set only at a command's entry, where one run (or one server's runs) is all the process
does, and never once bitsandbytes is imported already.
"""

import json
import sys
from pathlib import Path

from loraforge.model.sources import BUILTIN, folder_on_disk

NAME = "bitsandbytes"


def needs_bitsandbytes(config, trained_in: str | None = None) -> bool:
    """The run quantizes its base, uses a bitsandbytes optimizer, or loads a checkpoint saved quantized (its
    config.json has a quantization_config); a hub model not in the local cache counts as one, being unknown.
    trained_in: the folder a finished run trained in (manifest.json's cwd), where a relative model.name starts."""
    if config.quantization.mode != "none" or config.train.optimizer != "adamw_torch":
        return True
    if config.model.name in BUILTIN:
        return False
    name = Path(config.model.name).expanduser()
    if trained_in is not None and not name.is_absolute() and Path(trained_in).is_dir():
        name = Path(trained_in) / name
    folder = folder_on_disk(str(name))
    found = folder / "config.json" if folder is not None else _hub_cached_config(config.model.name,
                                                                                 config.model.revision)
    if found is None:
        return True
    try:
        return "quantization_config" in json.loads(Path(found).read_text())
    except (OSError, ValueError):
        return True


def leave_out_bitsandbytes(*configs, modules: dict = sys.modules, trained_in: tuple[str | None, ...] = ()) -> bool:
    """Mark bitsandbytes absent for this process when none of the runs of these configs needs it; returns whether
    it did. trained_in: for finished runs, the folder each trained in (needs_bitsandbytes)."""
    folders = trained_in or (None,) * len(configs)
    if NAME in modules or any(needs_bitsandbytes(config, folder) for config, folder in zip(configs, folders)):
        return False
    modules[NAME] = None
    return True


def _hub_cached_config(name: str, revision: str | None) -> str | None:
    import huggingface_hub

    try:
        found = huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:
        return None
    return found if isinstance(found, str) else None
