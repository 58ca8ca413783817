"""Content-addressed cache of tokenized data.

The key hashes everything that changes the tokens: the bytes of every data file, the tokenizer
(vocabulary, merges, special tokens), the chat template, the end-of-turn ids, every data setting and
the seed. Any change gives a new key; nothing is ever invalidated in place.
"""

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from loraforge import __version__
from loraforge.data.bundle import DataBundle, DataStats

log = logging.getLogger(__name__)

# Raised whenever the tokenized data that the same inputs give changes (2: preference pairs split by prompt;
# 3: a chat that opens with an assistant turn no longer trains the template's default system prompt; 4: masking all
# no longer trains messages marked train: false).
FORMAT = 4


def cache_key(data_config, seed: int, tokenizer, stop_ids) -> str:
    digest = hashlib.sha256()

    def add(label: str, value) -> None:
        digest.update(f"{label}={len(str(value))}:".encode())
        digest.update(str(value).encode())

    add("format", FORMAT)
    add("loraforge", __version__)
    add("data", data_config.model_dump_json())
    add("seed", seed)
    for source in data_config.sources:
        path = Path(source.path)
        add("file", data_file_digest(path) if path.is_file() else f"hub:{source.path}:{source.hub_split}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    add("tokenizer", backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True))
    add("special", json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    add("template", tokenizer.chat_template or "")
    add("stop", sorted(stop_ids))
    return digest.hexdigest()[:24]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_digests: dict[tuple, str] = {}


def data_file_digest(path: Path) -> str:
    """file_digest of a data file, hashed once per process while the file is unchanged on disk (the same path, inode,
    size, modification and change times), so that the cache key and manifest.json of a run read a large file once;
    a file written to since is hashed again."""
    before = _identity(path)
    known = _digests.get(before)
    if known is not None:
        return known
    digest = file_digest(path)
    if _identity(path) == before:
        _digests[before] = digest
    return digest


def _identity(path: Path) -> tuple:
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def load(cache_dir: Path, key: str):
    from datasets import load_from_disk

    folder = Path(cache_dir) / key
    if not (folder / "bundle.json").is_file():
        return None
    try:
        meta = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
        parts = {name: load_from_disk(str(folder / name)) if (folder / name).is_dir() else None
                 for name in ("train", "val", "test")}
        val_prompts, stats = meta["val_prompts"], DataStats(**meta["stats"])
    except Exception as exc:  # a damaged entry: json, datasets and pyarrow each raise their own types
        log.warning("tokenized data cache entry %s cannot be read (%s: %s); tokenizing again in its place", folder,
                    type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return DataBundle(
        train=parts["train"],
        val=parts["val"],
        test=parts["test"],
        val_prompts=val_prompts,
        stats=stats,
    )


def save(cache_dir: Path, key: str, bundle) -> Path:
    """Written to a temporary folder and renamed into place, so a half-written entry is never read."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = cache_dir / key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        for name in ("train", "val", "test"):
            part = getattr(bundle, name)
            if part is not None:
                part.save_to_disk(str(staging / name))
        meta = {"val_prompts": bundle.val_prompts, "stats": asdict(bundle.stats)}
        (staging / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "bundle.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
