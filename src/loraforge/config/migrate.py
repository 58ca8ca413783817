"""`loraforge config migrate`: a config written for a fine-tuning script (HF Trainer sections, TRL flat keys with
`_extends`, QLoRA training/lora/model sections, JSON with TrainingArguments names) turned into a loraforge
config. Every source key is either carried to a loraforge key or listed with the reason it is not."""

import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraforge.config.aliases import alias_of
from loraforge.config.load import load_config, model_at, read_yaml_file
from loraforge.config.schema import EVAL_METRICS, RunConfig
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.config.output_dir import file_in_the_way

# Section names scripts use, by the loraforge section their keys most likely belong to.
SECTIONS = {"model": "model", "dataset": "data", "data": "data", "training": "train", "train": "train",
            "trainer": "train", "lora": "lora", "peft": "lora", "evaluation": "train", "eval": "train",
            "logging": "logging"}
# Short names that mean a loraforge key only inside a section.
IN_SECTION = {
    "lora": {"r": "lora.r", "alpha": "lora.alpha", "dropout": "lora.dropout", "target_modules": "lora.target_modules",
             "bias": "lora.bias"},
    "train": {"batch_size": "train.batch_size", "epochs": "train.num_epochs"},
    "model": {"name": "model.name", "max_length": "data.max_length"},
    "data": {"max_length": "data.max_length"},
}
NOT_CARRIED = {
    "low_cpu_mem_usage": "transformers 5 always loads weights this way",
    "use_cpu": "loraforge trains on the GPU when there is one, else on the CPU",
    "padding": "loraforge pads each batch to its longest row: the same gradient, less compute",
    "greater_is_better": "loraforge knows it from train.best_metric: higher is better except for losses",
    "log_file": "every run writes train.log in its run directory",
    "log_to_file": "every run writes train.log in its run directory",
    "text_column": "used to infer data.sources[0].format and fields",
    "dataset_text_field": "used to infer data.sources[0].format and fields",
    "label_column": "used to infer data.sources[0].format and fields",
}
DTYPES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
          "auto": "auto"}
SCHEDULERS = {"cosine", "linear", "constant", "constant_with_warmup"}
OPTIMIZERS = {"adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}
TRACKERS = {"tensorboard", "wandb", "mlflow"}
NUMERIC = ("train.", "lora.r", "lora.alpha", "lora.dropout", "data.max_length", "data.val_fraction",
           "data.test_fraction", "seed", "preference.beta")
LOSS_TYPES = {"sigmoid", "hinge", "ipo"}
# The method a script's data implies when its config names none (TRL's DPO and KTO scripts are the method).
METHOD_OF_FORMAT = {"preference": "dpo", "unpaired_preference": "kto"}
PLACEHOLDER_DATA = "data/train.jsonl"
# A step count that a strategy key can override ("epoch" or "no").
STEP_COUNTS = {"save_steps": ("save_strategy",), "eval_steps": ("eval_strategy", "evaluation_strategy"),
               "logging_steps": ("logging_strategy",)}
# A data file's first row, read as training reads it, or LoraforgeError saying why not. The reader lives in the data
# layer, above config, so the command hands it in.
FirstRow = Callable[[str], dict]
DATA_KEYS = {"train_file", "data_path", "dataset_path", "dataset_name", "validation_file", "test_file"}


@dataclass
class Migration:
    config: dict
    rows: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # loraforge key -> the index of its row
    carried: dict[str, int] = field(default_factory=dict)
    # data files that are there and that training could not read either, each with why
    unreadable: list[str] = field(default_factory=list)

    def carry(self, source: str, key: str, value) -> None:
        if isinstance(value, (date, datetime)):
            value = value.isoformat()  # YAML reads 2024-05-01 as a date; a name is meant
        node = self.config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if key in self.carried and node[last] != value:
            first = self.rows[self.carried[key]][0]
            raise ConfigError([f"{first} and {source} both give {key} ({json.dumps(node[last], default=str)} and "
                               f"{json.dumps(value, default=str)}); keep one of them"])
        node[last] = value
        self.carried[key] = len(self.rows)
        self.rows.append((source, f"{key}: {json.dumps(value, default=str)}"))

    def withdraw(self, key: str, why: str) -> None:
        """A carried key that loraforge refuses in this config: left out, its row saying why."""
        parts = key.split(".")
        nodes = [self.config]
        for part in parts[:-1]:
            nodes.append(nodes[-1][part])
        del nodes[-1][parts[-1]]
        for depth in range(len(parts) - 1, 0, -1):  # a section left empty goes too
            if not nodes[depth]:
                del nodes[depth - 1][parts[depth - 1]]
        row = self.carried.pop(key)
        self.rows[row] = (self.rows[row][0], f"not carried: {why}")

    def skip(self, source: str, why: str) -> None:
        self.rows.append((source, f"not carried: {why}"))

    def table(self) -> str:
        width = max((len(s) for s, _ in self.rows), default=10)
        return "\n".join(f"  {source:<{width}}  ->  {target}" for source, target in self.rows)


def read_script_config(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    """The file's keys with its `_extends` (or `extends`) parents merged under them, mappings key by key."""
    if path.resolve() in stack:
        raise ConfigError([f"_extends forms a cycle at {path}"], source=str(path))
    if not path.exists():
        raise ConfigError([f"{path} not found" + (f" (named by _extends in {stack[-1]})" if stack else "")],
                          source=str(path))
    data = _read_json(path) if path.suffix.lower() == ".json" else read_yaml_file(path)[0]
    parent = data.pop("_extends", None) or data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError([f"{path}: _extends must name one file, got {parent!r}"], source=str(path))
    return _merge(read_script_config(path.parent / parent, (*stack, path.resolve())), data)


def _read_json(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError([f"{path} is a directory; pass the config file inside it"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start}); save the "
                           "file as UTF-8"], source=str(path)) from None
    except OSError as exc:
        raise ConfigError([f"{path} cannot be read: {exc.strerror}"], source=str(path)) from None

    def refuse_twice(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ConfigError([f"{path}: {key!r} is given twice in one object; JSON readers keep only the last "
                                   "one: merge them into one"], source=str(path))
            seen[key] = value
        return seen

    try:
        data = json.loads(text, object_pairs_hook=refuse_twice)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: cannot be read as JSON: {exc.msg}"], source=str(path)) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to read"], source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"], source=str(path))
    return data


def _merge(parent: dict, child: dict) -> dict:
    merged = dict(parent)
    for key, value in child.items():
        merged[key] = _merge(parent[key], value) if isinstance(value, dict) and isinstance(parent.get(key), dict) else value
    return merged


def leaves(data: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += leaves(value, (*prefix, str(key)))
        else:
            out.append(((*prefix, str(key)), value))
    return out


def migrate(path: str | Path, first_row: FirstRow) -> Migration:
    path = Path(path)
    source = read_script_config(path)
    try:
        load_config(path)
    except ConfigError:
        pass
    else:
        raise ConfigError([f"{path} is a loraforge config already: nothing to migrate; `loraforge config validate "
                           f"{path}` checks it"], source=str(path))
    found = leaves(source)
    names = {key[-1]: value for key, value in found}
    where = {key[-1]: ".".join(key) for key, _ in found}
    migration = Migration({})
    for key, value in found:
        _carry_one(migration, key, value, names)
    _data_source(migration, names, where, path, first_row)
    _layer_variant(migration, names, where)
    return migration


def _carry_one(migration: Migration, key: tuple[str, ...], value, names: dict) -> None:
    dotted, name = ".".join(key), key[-1]
    section = SECTIONS.get(key[0]) if len(key) > 1 else None
    own = own_key(key)
    if own is not None and (name not in SPECIAL or value is None):
        return migration.carry(dotted, own, _number(value) if own.startswith(NUMERIC) else value)
    if name in DATA_KEYS or name in ("model_type", "layer_to_drop", "keep_layers"):
        return
    if name in NOT_CARRIED:
        return migration.skip(dotted, NOT_CARRIED[name])
    if value is None:
        return migration.skip(dotted, "null: loraforge's default applies")
    overriding = [s for s in STEP_COUNTS.get(name, ()) if names.get(s) in ("epoch", "no")]
    if overriding:
        return migration.skip(dotted, f"{overriding[0]} is {names[overriding[0]]!r}, so the step count does not apply")
    if name in STEP_COUNTS and isinstance(_number(value), float) and 0 < _number(value) < 1:
        return migration.skip(dotted, f"{value}: a fraction of the run's steps, as HF reads a value below 1; "
                                      "loraforge takes a step count")
    handler = SPECIAL.get(name)
    if handler is not None:
        return handler(migration, dotted, value, names)
    target = IN_SECTION.get(section, {}).get(name) or alias_of(name)
    if target is None:
        return migration.skip(dotted, "unknown to loraforge; see `loraforge config schema` for what it has")
    migration.carry(dotted, target, _number(value) if target.startswith(NUMERIC) else value)


def own_key(key: tuple[str, ...]) -> str | None:
    """The key, where the source names it as loraforge does (`train.grad_accum`, `data.sources`, a label under
    `classification.class_weights`): such a key means what it says."""
    for depth, part in enumerate(key):
        model = model_at(key[:depth])
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        if depth == len(key) - 1 or dict in map(typing.get_origin, (annotation, *typing.get_args(annotation))):
            return ".".join(key)
    return None


def _number(value):
    """`2e-4` is a string to YAML 1.1; scripts pass it to float(), so it is a number here."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _precision(migration, dotted, value, names):
    if isinstance(value, bool):
        if not value:
            return migration.skip(dotted, "false: precision auto chooses by what the machine runs fastest")
        return migration.carry(dotted, "precision", "bf16" if dotted.endswith("bf16") else "fp16")
    if str(value).removeprefix("torch.") not in DTYPES:
        return migration.skip(dotted, f"{value!r} is not a dtype loraforge knows (fp32, bf16, fp16, auto)")
    migration.carry(dotted, "precision", DTYPES[str(value).removeprefix("torch.")])


def _log_level(migration, dotted, value, names):
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        return migration.skip(dotted, f"{value!r} is not a log level (debug, info, warning, error)")
    migration.carry(dotted, "logging.level", level)


def _report_to(migration, dotted, value, names):
    wanted = [value] if isinstance(value, str) else list(value or [])
    kept = [v for v in wanted if v in TRACKERS]
    if wanted and wanted != ["none"] and len(kept) < len(wanted):
        migration.notes.append(f"{dotted}: {sorted(set(wanted) - TRACKERS - {'none'})} dropped; loraforge reports to "
                               "tensorboard, wandb and mlflow")
    migration.carry(dotted, "report_to", kept)


def _choice(target: str, allowed: set[str]):
    def carry(migration, dotted, value, names):
        if not isinstance(value, str) or value not in allowed:
            return migration.skip(dotted, f"{value!r} is not one of {sorted(allowed)}")
        migration.carry(dotted, target, value)
    return carry


def _strategy(target: str):
    def carry(migration, dotted, value, names):
        if not isinstance(value, str):
            return migration.skip(dotted, f"{value!r} is not a strategy (no, steps, epoch)")
        if value == "epoch":
            return migration.carry(dotted, target, "epoch")
        if value == "no" and target == "train.save_every":
            return migration.carry(dotted, target, None)
        if value == "no":
            return migration.skip(dotted, "loraforge evaluates on data.val_fraction (0.05) of the rows; set "
                                  "data.val_fraction: 0 for none")
        migration.skip(dotted, "steps is what loraforge does; the step count comes from "
                       f"{'save_steps' if 'save' in target else 'eval_steps'}")
    return carry


def _epochs(migration, dotted, value, names):
    steps = _number(names.get("max_steps", -1))
    if isinstance(steps, int) and steps > 0:
        return migration.skip(dotted, "max_steps is set, and it wins over epochs in the script as here")
    migration.carry(dotted, "train.num_epochs", _number(value))


def _warmup_ratio(migration, dotted, value, names):
    if _number(names.get("warmup_steps") or 0):
        return migration.skip(dotted, "warmup_steps is set, and it wins over the ratio in the script as here")
    migration.carry(dotted, "train.warmup_ratio", _number(value))


def _warmup_steps(migration, dotted, value, names):
    steps = _number(value)
    if not steps and names.get("warmup_ratio") is not None:
        return migration.skip(dotted, "0 means: use warmup_ratio, as in the script")
    if isinstance(steps, float) and 0 < steps < 1:
        return migration.carry(dotted, "train.warmup_ratio", steps)  # transformers 5 reads a value below 1 as a ratio
    migration.carry(dotted, "train.warmup_steps", steps)


def _max_steps(migration, dotted, value, names):
    steps = _number(value)
    if not isinstance(steps, int) or steps <= 0:
        return migration.skip(dotted, f"{value!r}: a count of 0 or less means train by epochs")
    migration.carry(dotted, "train.max_steps", _number(value))


def _best_metric(migration, dotted, value, names):
    migration.carry(dotted, "train.best_metric", value if str(value).startswith("eval_") else f"eval_{value}")


def _truncation(migration, dotted, value, names):
    if value is True:
        return migration.carry(dotted, "data.truncation", "truncate")
    if value in ("drop", "truncate", "error"):
        return migration.carry(dotted, "data.truncation", value)
    migration.skip(dotted, "loraforge drops longer rows by default and counts them (data.truncation: drop)")


def _loss_type(migration, dotted, value, names):
    """TRL takes DPO's loss as a name or a list of names (weighted together); loraforge trains one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    _choice("preference.loss_type", LOSS_TYPES)(migration, dotted, value, names)


def _use_lora(migration, dotted, value, names):
    migration.carry(dotted, "adapter", "lora" if value else "full")


def _load_in_bits(migration, dotted, value, names):
    if not value:
        return migration.skip(dotted, "false: the base loads unquantized")
    _carry_mode(migration, dotted, "8bit" if dotted.endswith("8bit") else "4bit")


def _carry_mode(migration, dotted, mode: str) -> None:
    """quantization: MODE, or its mode where a 4-bit setting has made it a mapping already."""
    nested = isinstance(migration.config.get("quantization"), dict)
    migration.carry(dotted, "quantization.mode" if nested else "quantization", mode)


def _source_bits(names: dict) -> str:
    """How the source loads its base: 4bit, 8bit or none."""
    if names.get("load_in_4bit") is True or names.get("adapter") == "qlora" or names.get("quantization") == "4bit":
        return "4bit"
    if names.get("load_in_8bit") is True or names.get("quantization") == "8bit":
        return "8bit"
    return "none"


def _bnb_4bit(field: str, allowed: set):
    """A QLoRA script's 4-bit setting (BitsAndBytesConfig's bnb_4bit_*): carried for a 4-bit base only, since
    bitsandbytes' 8-bit loading has no such setting and an unquantized base none at all."""
    def carry(migration, dotted, value, names):
        bits = _source_bits(names)
        if bits != "4bit":
            return migration.skip(dotted, "a 4-bit setting, which bitsandbytes' 8-bit loading does not have" if
                                  bits == "8bit" else "a 4-bit setting, and the base loads unquantized")
        if field == "compute_dtype" and isinstance(value, str):
            value = DTYPES.get(value.removeprefix("torch."), value)
        if value not in allowed:
            return migration.skip(dotted, f"{value!r} is not one of {sorted(allowed, key=str)}")
        if isinstance(migration.config.get("quantization"), str):
            migration.config["quantization"] = {"mode": migration.config["quantization"]}
        migration.carry(dotted, f"quantization.{field}", value)
    return carry


def _adapter(migration, dotted, value, names):
    """Axolotl's adapter: lora, or qlora (LoRA on a 4-bit base); loraforge's own lora or full."""
    if value == "qlora":
        _carry_mode(migration, dotted, "4bit")
        value = "lora"
    _choice("adapter", {"lora", "full"})(migration, dotted, value, names)


def _task_type(migration, dotted, value, names):
    """PEFT's task type: SEQ_CLS trains a classifier, CAUSAL_LM is loraforge's default."""
    if value == "SEQ_CLS":
        return migration.carry(dotted, "task", "classification")
    if value == "CAUSAL_LM":
        return migration.skip(dotted, "task: causal_lm is loraforge's default")
    migration.skip(dotted, f"{value!r}: loraforge trains causal_lm (CAUSAL_LM) and classification (SEQ_CLS)")


def _lora_r(migration, dotted, value, names):
    migration.carry(dotted, "lora.r", _number(value))


SPECIAL = {
    "dtype": _precision, "torch_dtype": _precision, "bf16": _precision, "fp16": _precision,
    "log_level": _log_level, "report_to": _report_to,
    "lr_scheduler_type": _choice("train.lr_scheduler", SCHEDULERS), "optim": _choice("train.optimizer", OPTIMIZERS),
    "evaluation_strategy": _strategy("train.eval_every"), "eval_strategy": _strategy("train.eval_every"),
    "save_strategy": _strategy("train.save_every"),
    "num_train_epochs": _epochs, "epochs": _epochs, "warmup_ratio": _warmup_ratio, "warmup_steps": _warmup_steps,
    "max_steps": _max_steps,
    "metric_for_best_model": _best_metric, "truncation": _truncation, "use_lora": _use_lora, "lora_r": _lora_r,
    "loss_type": _loss_type, "rl": _choice("method", {"dpo", "orpo", "kto"}),
    "load_in_4bit": _load_in_bits, "load_in_8bit": _load_in_bits, "adapter": _adapter, "precision": _precision,
    "num_epochs": _epochs, "task_type": _task_type,
    "bnb_4bit_quant_type": _bnb_4bit("quant_type", {"nf4", "fp4"}),
    "bnb_4bit_use_double_quant": _bnb_4bit("double_quant", {True, False}),
    "bnb_4bit_compute_dtype": _bnb_4bit("compute_dtype", {"fp32", "bf16"}),
}


def _data_source(migration: Migration, names: dict, where: dict, origin: Path, first_row: FirstRow) -> None:
    splits = {"train_file": "train", "data_path": "train", "dataset_path": "train", "dataset_name": "train",
              "validation_file": "val", "test_file": "test"}
    sources = list(migration.config.get("data", {}).get("sources") or [])
    for name, split in splits.items():
        if not names.get(name):
            continue
        given = Path(str(names[name]))
        path = _found_beside(given, origin)
        if path != given:
            migration.notes.append(f"{where[name]}: {given} is not in this folder but beside {origin}: written as "
                                   f"{path} (loraforge reads data paths from the folder it runs in)")
        source = {"path": str(path)}
        try:
            row, unread = first_row(str(path)), ""  # read from the cwd, as training reads it
        except LoraforgeError as exc:
            row, unread = None, str(exc)
        if unread and path.is_file():
            migration.unreadable.append(f"data.sources[{len(sources)}].path: {unread}")
        fmt, fields, why = infer_format(path, names, row, unread)
        source["format"] = fmt
        if fields:
            source["fields"] = fields
        if split != "train":
            source["split"] = split
        migration.notes.append(f"{where[name]}: format {fmt} ({why})")
        sources.append(source)
        migration.rows.append((where[name], f"data.sources[{len(sources) - 1}]: {json.dumps(source)}"))
    if not sources:
        sources = [{"path": PLACEHOLDER_DATA, "format": "messages"}]
        migration.notes.append(f"the source names no data file ({', '.join(splits)}); data.sources holds "
                               f"{PLACEHOLDER_DATA} in the messages format as a placeholder: point it at your data")
    migration.config.setdefault("data", {})["sources"] = sources
    implied = {METHOD_OF_FORMAT[s.get("format")] for s in sources if isinstance(s, dict)
               and s.get("format") in METHOD_OF_FORMAT}
    if "method" not in migration.config and len(implied) == 1:
        method = implied.pop()
        migration.config["method"] = method
        held = "pairs (orpo and kto also train on pairs)" if method == "dpo" else "answers labelled good or bad"
        migration.notes.append(f"method {method}: the data holds {held} and the source names no method")


def _found_beside(given: Path, origin: Path) -> Path:
    """A relative data path as the working folder sees it: scripts often read it from the config's folder, so a
    file found there, and not here, is given by its path from here."""
    beside = origin.parent / given
    if given.is_absolute() or given.exists() or not beside.is_file():
        return given
    return Path(os.path.relpath(beside))


def infer_format(path: Path, names: dict, row: dict | None, unread: str) -> tuple[str, dict, str]:
    """(format, fields, why) of a data file, from its first row when it could be read, else from the config."""
    text_column = names.get("text_column") or names.get("dataset_text_field")
    label_column = names.get("label_column") or ("label" if names.get("task_type") == "SEQ_CLS" else None)
    if row is None:
        unread = f"not read to detect the format: {unread}"
        if label_column:
            return "classification", _fields({"text": text_column, "label": label_column}), f"from label_column; {unread}"
        if text_column:
            return "text", _fields({"text": text_column}), f"from text_column; {unread}"
        return "messages", {}, f"assumed, check it; {unread}"
    if label_column and label_column in row:
        return "classification", _fields({"text": text_column or "text", "label": label_column}), f"first row of {path}"
    for fmt, needed in (("preference", {"chosen", "rejected"}), ("messages", {"messages"}),
                        ("alpaca", {"instruction", "output"}), ("sharegpt", {"conversations"}),
                        ("unpaired_preference", {"prompt", "completion", "label"}),
                        ("prompt_completion", {"prompt", "completion"})):
        if needed <= set(row):
            return fmt, {}, f"first row of {path} has {sorted(needed)}"
    column = text_column or "text"
    if column in row:
        return "text", _fields({"text": column}), f"first row of {path} has {column!r}"
    return "messages", {}, f"first row of {path} has {sorted(row)}: none of the known shapes, assumed messages"


def _fields(mapping: dict) -> dict:
    return {k: v for k, v in mapping.items() if v and v != k}


def _layer_variant(migration: Migration, names: dict, where: dict) -> None:
    kind = names.get("model_type")
    for extra in ("layer_to_drop", "keep_layers"):
        if extra not in names or own_key(tuple(where[extra].split("."))) is not None:
            continue
        if kind not in ({"layer_to_drop": "dropped", "keep_layers": "pruned"}[extra],):
            migration.skip(where[extra], f"used only with model_type: {'dropped' if extra == 'layer_to_drop' else 'pruned'}")
    if kind in (None, "original"):
        if kind is not None:
            migration.skip(where["model_type"], "original: the model as it is, loraforge's default")
        return
    if kind == "dropped" and names.get("layer_to_drop") is not None:
        drop = names["layer_to_drop"]
        migration.carry(where["model_type"], "model.variant", "drop_layers")
        migration.carry(where["layer_to_drop"], "model.drop_layers", drop if isinstance(drop, list) else [_number(drop)])
    elif kind == "pruned" and names.get("keep_layers") is not None:
        migration.carry(where["model_type"], "model.variant", "keep_layers")
        migration.carry(where["keep_layers"], "model.keep_layers", _number(names["keep_layers"]))
    else:
        migration.skip(where["model_type"], f"{kind!r} without the layer key it needs (layer_to_drop or keep_layers)")


def migrated_yaml(migration: Migration, source: Path) -> str:
    """The migrated config as YAML, once it validates. A carried value that loraforge refuses beside the others
    (dropout for DPO, a metric the method does not report) is left out with the reason in its row; ConfigError for
    a value wrong in itself, or a refusal no carried key explains."""
    while True:
        try:
            RunConfig.model_validate(migration.config)
            break
        except ValidationError as exc:
            explained = {key: err["msg"].removeprefix("Value error, ") for err in exc.errors()
                         for key in [_withdrawable(err, migration)] if key is not None}
            if not explained:
                raise ConfigError([_refusal(err, migration) for err in exc.errors()], source=str(source)) from None
            for key, why in explained.items():
                migration.withdraw(key, why)
    head = f"# Migrated from {source} by `loraforge config migrate`; every source key is listed in its output.\n"
    return head + yaml.safe_dump(migration.config, sort_keys=False, allow_unicode=True)


def _refusal(error: dict, migration: Migration) -> str:
    """A validation error of the migrated config, named by the source key it came from where one is known."""
    at = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    named = [key for key in migration.carried if key == at or key in message]
    if not named:
        return f"the migrated config{f' ({at})' if at else ''}: {message}"
    key = max(named, key=len)
    return f"{migration.rows[migration.carried[key]][0]} (carried to {key}): {message}"


def _withdrawable(error: dict, migration: Migration) -> str | None:
    """The carried key a check across keys refuses, where the script's value is right for the script: LoRA dropout
    under a preference method (TRL applies it; loraforge's reference pass must not), or a metric that another task
    or method reports. None for anything else: a value wrong in itself stops the migration."""
    value = {"lora.dropout": migration.config.get("lora", {}).get("dropout"),
             "train.best_metric": migration.config.get("train", {}).get("best_metric")}
    reported = {metric for metrics in EVAL_METRICS.values() for metric in metrics}
    if "lora.dropout" in migration.carried and f"lora.dropout {value['lora.dropout']}" in error["msg"]:
        return "lora.dropout"
    if ("train.best_metric" in migration.carried and value["train.best_metric"] in reported
            and "train.best_metric" in error["msg"]):
        return "train.best_metric"
    return None


def write_migrated(source: str | Path, out: str | Path | None, first_row: FirstRow) -> tuple[Migration, str]:
    """Migrate `source`; with `out`, write the YAML there (never over an existing file). (migration, yaml)."""
    migration = migrate(source, first_row)
    text = migrated_yaml(migration, Path(source))
    if out is not None:
        out = Path(out)
        if out.exists():
            raise ConfigError([f"--out {out} already exists; loraforge never overwrites a file it did not write: "
                               "choose a new name"], source=str(source))
        blocking = file_in_the_way(out)
        if blocking is not None:
            raise ConfigError([f"--out {out}: {blocking} is a file, not a folder; choose another path"],
                              source=str(source))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("x", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise ConfigError([f"--out {out} cannot be written ({exc.strerror or exc}); choose a path in a folder "
                               "you can write"], source=str(source)) from None
    return migration, text
