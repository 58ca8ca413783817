"""The one set-up path from a config to what a run trains on: the model's path and config, its tokenizer with
the run's chat template, the ids that end an assistant turn, and the tokenized datasets.

Training, `estimate`, `data preview`, `eval` and the exports all come through here, so they see the same
tokens and the same stop ids.
"""

import logging
from dataclasses import dataclass, field

from loraforge.data.build import DataStats, build_datasets
from loraforge.data.classify import build_classification
from loraforge.data.render import stop_token_ids
from loraforge.model.load import load_model_config, load_tokenizer
from loraforge.model.sources import loraforge_home, resolve_model
from loraforge.model.variants import kept_layers

log = logging.getLogger("loraforge.train")


@dataclass
class Prepared:
    model_path: str
    model_config: object
    tokenizer: object
    stop_ids: frozenset[int]
    train: object
    val: object | None
    stats: DataStats
    val_prompts: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    class_weights: list[float] | None = None


def model_stop_ids(tokenizer, model_path: str, model_config=None, revision: str | None = None) -> frozenset[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config (generation_config.json, or what
    transformers derives from the model config when there is none), without loading the weights."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_path, revision=revision)
    except OSError:
        generation = GenerationConfig.from_model_config(model_config) if model_config is not None else None
    return stop_token_ids(tokenizer, generation)


def model_and_tokenizer(config) -> tuple[str, object, object]:
    """(path, config, tokenizer) of the config's model, with the run's chat template."""
    m = config.model
    path = resolve_model(m.name, m.revision)
    model_config = load_model_config(path, m.revision, m.trust_remote_code)
    if isinstance(getattr(model_config, "num_hidden_layers", None), int):
        kept_layers(model_config.num_hidden_layers, m.variant, m.drop_layers, m.keep_layers)
    tokenizer = load_tokenizer(path, config.data.chat_template, m.revision, m.trust_remote_code)
    return path, model_config, tokenizer


def prepare(config, cache: bool = True) -> Prepared:
    """Model path, tokenizer, stop ids and tokenized datasets for the config's task."""
    path, model_config, tokenizer = model_and_tokenizer(config)
    if config.task == "classification":
        train, val, labels, weights, stats = build_classification(config.data, config.classification, tokenizer,
                                                                  config.seed)
        log.info("labels: %s%s", labels, f"; class weights {[round(w, 3) for w in weights]}" if weights else "")
        return Prepared(path, model_config, tokenizer, frozenset(), train, val, stats, labels=labels,
                        class_weights=weights)
    stop_ids = model_stop_ids(tokenizer, path, model_config, config.model.revision)
    bundle = build_datasets(config.data, tokenizer, stop_ids, config.seed,
                            cache_dir=loraforge_home() / "data-cache" if cache else None)
    return Prepared(path, model_config, tokenizer, stop_ids, bundle.train, bundle.val, bundle.stats,
                    val_prompts=bundle.val_prompts)
