"""What `loraforge serve` answers for: each run under its directory's name, and each base under its own name.
Runs on the same base (same model, revision, quantization, layer variant and compute dtype) share one copy of it,
each run a PEFT adapter on it; a run that trained every weight (adapter: full) is a model of its own. Each run
computes in bf16 where it trained in bf16 and bf16 is fast here, else in fp32 (trained.py precision_here)."""

import logging
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loraforge import rundir
from loraforge.data.render import stop_token_ids
from loraforge.errors import RunDirError
from loraforge.model.load import context_length, load_tokenizer
from loraforge.trained import load_trained_model, precision_here

log = logging.getLogger("loraforge.serve")

BASE = "__base__"


@dataclass
class Base:
    """One loaded model: a base with the adapters of its runs (PEFT), or a fully fine-tuned model."""

    model: object
    context: int
    mixed_batches: bool
    adapters: list[str] = field(default_factory=list)
    all_layers: bool = True


@dataclass
class Served:
    """A name a request's `model` may give: a run (its adapter on its base) or a base with every adapter off."""

    name: str
    base: Base
    adapter: str | None
    tokenizer: object
    stop_ids: frozenset[int]
    system_prompt: str | None
    max_new_tokens: int


def _rss_mb() -> float:
    """Resident memory now (Linux); elsewhere the peak so far, which still grows by what a load adds."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _base_key(folder: Path, config, precision: str) -> tuple:
    m = config.model
    return (rundir.base_model(folder, config), m.revision,
            config.quantization.model_dump_json(), m.attn_implementation, config.lora.use_dora, m.variant,
            tuple(m.drop_layers), m.keep_layers, precision)


def _checked_runs(run_dirs: list[str]) -> dict[Path, object]:
    """Each run's config, every run checked before any model loads (a bad last one costs no minutes of loading):
    chat runs only, each name once."""
    runs, named = {}, {}
    for folder in map(Path, run_dirs):
        config = rundir.read_config(folder)
        name = folder.resolve().name
        if config.task != "causal_lm":
            raise RunDirError(f"{folder} is a {config.task} run; serve answers chats, so give it causal_lm runs")
        if name in named:
            raise RunDirError(f"two runs are named {name!r} ({named[name]} and {folder}); requests name a run by its "
                              "directory's name, so rename one directory")
        runs[folder], named[name] = config, folder
    return runs


def load_served(run_dirs: list[str]) -> dict[str, Served]:
    """Every run of run_dirs by name, and each of their bases under its model name; logs the memory each takes.
    Each run loads as chat loads it (trained.load_trained_model); later runs on a loaded base add their adapter."""
    served: dict[str, Served] = {}
    bases: dict[tuple, tuple[Base, str]] = {}
    runs = _checked_runs(run_dirs)
    for folder, config in runs.items():
        name = folder.resolve().name
        tokenizer = load_tokenizer(str(folder / rundir.TOKENIZER))
        precision = precision_here(folder, config)
        before = _rss_mb()
        if (folder / rundir.MODEL / "config.json").is_file():
            model = load_trained_model(folder, config, precision)
            base, adapter = Base(model, context_length(model.config), mixed_batches=False), None
            log.info("run %s: its own fine-tuned model, %.0f MB", name, _rss_mb() - before)
        else:
            rundir.check_adapter(folder / rundir.ADAPTER)
            key = _base_key(folder, config, precision)
            if key not in bases:
                model = load_trained_model(folder, config, precision, adapter_name=name)
                # PEFT runs rows of different adapters in one batch, except for DoRA layers.
                bases[key] = (Base(model, context_length(model.config), mixed_batches=not config.lora.use_dora,
                                   all_layers=config.model.variant == "original"), config.model.name)
                log.info("base %s loaded with run %s: %.0f MB", config.model.name, name, _rss_mb() - before)
            else:
                bases[key][0].model.load_adapter(str(folder / rundir.ADAPTER), adapter_name=name)
                log.info("run %s: an adapter on base %s, %.0f MB", name, bases[key][1], _rss_mb() - before)
            base, adapter = bases[key][0], name
            base.adapters.append(name)
        served[name] = Served(name, base, adapter, tokenizer, stop_ids=stop_token_ids(tokenizer, base.model.generation_config),
                              system_prompt=config.data.system_prompt, max_new_tokens=config.eval.max_new_tokens)
    # A model loaded as several bases (runs with and without DoRA, or with layers removed) answers once under its
    # name, from a base with all its layers where there is one.
    for key, (base, model_name) in sorted(bases.items(), key=lambda item: not item[1][0].all_layers):
        if model_name in served and served[model_name].adapter is None and served[model_name].base.adapters:
            continue
        if model_name in served:
            raise RunDirError(f"a run directory is named {model_name!r}, the name its base answers under; rename it")
        tokenizer = load_tokenizer(key[0])
        served[model_name] = Served(model_name, base, None, tokenizer, stop_token_ids(tokenizer, base.model.generation_config),
                                    system_prompt=None, max_new_tokens=next(
                                        s.max_new_tokens for s in served.values() if s.base is base))
    return served
