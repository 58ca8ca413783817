"""Whether the modules a config names for LoRA (lora.target_modules, lora.modules_to_save) are in the model: checked
against a loaded model by `train`, and against a model folder's weight names, read from its safetensors headers
without loading anything, by `config validate`. Only validate reads the headers: transformers may load a checkpoint
under other module names than its files hold (its conversion mappings), where the loaded model decides."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from loraforge.model.sources import folder_on_disk

# A safetensors header longer than this is not one (the format caps it at 100 MB).
HEADER_LIMIT = 100_000_000


@dataclass
class Modules:
    names: set[str]
    linear: list[str]
    tied_head: bool


def target_problems(modules: Modules, target_modules, modules_to_save: list[str] | None) -> list[str]:
    """What of lora.target_modules and lora.modules_to_save the model cannot take: names it has no module of, and
    LoRA on an lm_head tied to the embeddings."""

    def missing(wanted: list[str]) -> list[str]:
        return [t for t in wanted if not any(n == t or n.endswith("." + t) for n in modules.names)]

    problems = []
    if isinstance(target_modules, list):
        unknown = missing(target_modules)
        if unknown:
            problems.append(f"lora.target_modules: {unknown} are not modules of this model; its linear layers are "
                            f"{modules.linear} (or use all-linear)")
        elif "lm_head" in target_modules and modules.tied_head:
            problems.append("lora.target_modules: lm_head shares its weights with the input embeddings in this model "
                            "(tie_word_embeddings), so LoRA on it cannot be merged into one matrix; train it in full "
                            "with lora.modules_to_save: [lm_head], or leave it out")
    unknown = missing(modules_to_save or [])
    if unknown:
        problems.append(f"lora.modules_to_save: {unknown} are not modules of this model; give names of its modules "
                        "(lm_head, embed_tokens; score for classification)")
    return problems


def targets_on_disk(config) -> list[str]:
    """target_problems of a LoRA run whose model is a folder on disk (a built-in one once converted), from the modules
    its weight files name."""
    folder = folder_on_disk(config.model.name)
    modules = modules_on_disk(folder, config.task) if folder is not None and config.adapter == "lora" else None
    return [] if modules is None else target_problems(modules, config.lora.target_modules, config.lora.modules_to_save)


def modules_on_disk(folder: str | Path, task: str = "causal_lm") -> Modules | None:
    """The modules of a model folder, from the tensor names of its safetensors files (and the head a classification
    run adds, and an lm_head tied to the embeddings, which the files do not hold); None where the folder has no
    readable safetensors weights."""
    folder = Path(folder)
    try:
        settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        index = folder / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                 if index.is_file() else ["model.safetensors"])
        tensors = {name: shape for file in files for name, shape in _header(folder / file).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    names = {prefix for name in tensors for prefix in _owners(name)}
    linear = {name.rsplit(".", 2)[-2] for name, shape in tensors.items()
              if name.endswith(".weight") and len(shape) == 2 and "embed" not in name}
    tied = bool(settings.get("tie_word_embeddings", False)) if isinstance(settings, dict) else False
    extra = ({"score"} if task == "classification" else set()) | ({"lm_head"} if tied and task != "classification"
                                                                  else set())
    return Modules(names | extra, sorted(linear | ({"lm_head"} if "lm_head" in extra else set())), tied)


def _header(file: Path) -> dict[str, list[int]]:
    with file.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > HEADER_LIMIT:
            raise ValueError(f"{file}: not a safetensors file")
        header = json.loads(fh.read(length))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def _owners(tensor: str) -> list[str]:
    """The modules a tensor belongs to: model.layers.0.mlp.up_proj.weight -> model.layers.0.mlp.up_proj, its
    parents, and so on up."""
    parts = tensor.split(".")[:-1]
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
