"""YAML file → `extends` chain → KEY=VALUE overrides → validated RunConfig."""

import copy
import difflib
import json
import re
import shlex
import stat
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from loraforge.config.aliases import alias_of
from loraforge.config.schema import ONE_OF, RunConfig
from loraforge.errors import ConfigError

Key = tuple[str | int, ...]
# This many keys named as a script names them make a config one to migrate rather than to fix key by key.
SCRIPT_SHAPED = 3
# One dotted piece of an override's key: a name, then any list positions ([0]).
KEY_PIECE = re.compile(r"([^.\[\]\s]+)((?:\[\d+\])*)")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] | str | None = ()) -> RunConfig:
    """Read a config file with its parents and overrides (KEY=VALUE strings; one string is one override); every
    problem is raised at once as ConfigError."""
    path = Path(path)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides or ())
    strange = [item for item in overrides if not isinstance(item, str)]
    if strange:
        raise ConfigError([f"override {item!r}: give KEY=VALUE text, e.g. 'lora.r=8'" for item in strange],
                          source=str(path))
    data, origins = _read_with_parents(path, stack=())
    problems: list[str] = []
    overridden: dict = {}
    for item in overrides:
        problem = _apply_override(data, origins, item)
        if problem:
            problems.append(problem)
        else:
            _apply_override(overridden, {}, item)
    _layer_replaces_pairs(data, overridden.get("train"))
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_describe(err, origins, str(path)) for err in exc.errors())
        # Only keys of the file: migrate rewrites files, and script names given as overrides get their hints alone.
        script_names = [err for err in exc.errors() if err["type"] == "extra_forbidden"
                        and alias_of(str(err["loc"][-1])) not in (None, _dotted(tuple(err["loc"])))
                        and not _origin(tuple(err["loc"]), origins, str(path)).startswith("command line")]
        if len(script_names) >= SCRIPT_SHAPED:
            problems.append(f"{path}: {len(script_names)} keys are named as a fine-tuning script names them: "
                            f"`loraforge config migrate {path}` writes the loraforge config they mean")
        config = None
    if problems:
        raise ConfigError(problems, source=str(path))
    return config


def located(path: str | Path, overrides: list[str] | tuple[str, ...], problems: list[str]) -> list[str]:
    """Problems found once the config validated (against its data, its model, this machine), each that starts with a
    key led by where that key is set: the file and line, or the command-line override; as they are where the config
    cannot be read again or the key is set nowhere (a default)."""
    try:
        data, origins = _read_with_parents(Path(path), stack=())
    except ConfigError:
        return list(problems)
    for item in overrides:
        _apply_override(data, origins, item)
    out = []
    for problem in problems:
        parts = _override_key(problem.split(": ", 1)[0]) if ": " in problem else None
        where = _origin(tuple(parts), origins, "") if parts else ""
        out.append(f"{where}: {problem}" if where and not problem.startswith(where) else problem)
    return out


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_resolved(config: RunConfig, run_dir: str | Path) -> Path:
    out = Path(run_dir) / "resolved.yaml"
    out.write_text(config_to_yaml(config), encoding="utf-8")
    return out


def _read_with_parents(path: Path, stack: tuple[Path, ...]) -> tuple[dict, dict[Key, str]]:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError([f"extends forms a cycle: {chain}; remove one of these extends"], source=str(stack[0]))
    data, origins = read_yaml_file(path)
    if "extends" in data and "_extends" in data:
        raise ConfigError([f"{origins[('_extends',)]}: _extends and extends (at {origins[('extends',)]}) are the same "
                           "key; keep one"], source=str(path))
    key = "_extends" if "_extends" in data else "extends"
    parent_ref = data.pop(key, None)
    extends_at = origins.pop((key,), str(path))
    if parent_ref is None:
        return data, origins
    if not isinstance(parent_ref, str):
        raise ConfigError([f"{extends_at}: extends must be a path to a YAML file, got {parent_ref!r}"], source=str(path))
    parent_path = path.parent / parent_ref
    if not parent_path.exists():
        raise ConfigError(
            [f"{extends_at}: extends: {parent_ref!r} not found (looked for {parent_path}); paths are relative to {path}"],
            source=str(path),
        )
    if not parent_path.is_file():
        raise ConfigError([f"{extends_at}: extends: {parent_ref!r} is {kind_of(parent_path)} ({parent_path}); name "
                           "the YAML file to extend"], source=str(path))
    parent, parent_origins = _read_with_parents(parent_path, (*stack, resolved))
    merged = _merge(parent, data, parent_origins, origins)
    _layer_replaces_pairs(merged, data.get("train"))
    return merged, {**parent_origins, **origins}


def read_yaml_file(path: Path) -> tuple[dict, dict[Key, str]]:
    """One YAML file's mapping and the file:line of each key: refused, naming file and line, when it is not UTF-8,
    not YAML, not a mapping, gives a key twice, or expands past what a config needs."""
    if path.is_dir():
        raise ConfigError([f"config {path} is a directory; pass the YAML file inside it"], source=str(path))
    if not path.exists():
        raise ConfigError([f"config file {path} not found"], source=str(path))
    if not path.is_file():
        raise ConfigError([f"config {path} is {kind_of(path)}, not a file; pass a YAML file"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#x}); save the file as UTF-8"],
                          source=str(path)) from None
    except OSError as exc:
        raise ConfigError([f"config {path} cannot be read: {exc.strerror}"], source=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        check_expansion(node, path)
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to read; a config needs a few levels"], source=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: not valid YAML: {reason}"], source=str(path)) from None
    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys, got {type(data).__name__}"], source=str(path))
    origins: dict[Key, str] = {}
    duplicates: list[str] = []
    if node is not None:
        _record_lines(node, (), path, origins, duplicates)
    if duplicates:
        raise ConfigError(duplicates, source=str(path))
    return data, origins


def kind_of(path: Path) -> str:
    """What a path that is not a regular file is, in words; such a path is refused before it is opened, since
    opening a named pipe with no writer waits forever."""
    mode = path.stat().st_mode
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


MAX_VALUES = 100_000
MAX_DEPTH = 64


def check_expansion(node: yaml.Node | None, path: Path) -> None:
    """Refuse what aliases would blow up: a value that contains itself, nesting past MAX_DEPTH, or more than
    MAX_VALUES values once every alias is expanded (a few lines of `&a [*b, *b, ...]` can mean billions)."""
    if node is None:
        return
    measured: dict[int, tuple[int, int]] = {}

    def refuse(current: yaml.Node, problem: str):
        raise ConfigError([f"{path}:{current.start_mark.line + 1}: {problem}"], source=str(path))

    def measure(current: yaml.Node, ancestors: tuple[int, ...]) -> tuple[int, int]:
        """(values, height) of the node with its aliases expanded."""
        if id(current) in ancestors:
            refuse(current, "an alias here refers to a value that contains it; YAML aliases must not form a loop")
        if id(current) not in measured:
            children = ([v for pair in current.value for v in pair] if isinstance(current, yaml.MappingNode)
                        else current.value if isinstance(current, yaml.SequenceNode) else [])
            total, height = 1, 0
            for child in children:
                values, below = measure(child, (*ancestors, id(current)))
                total, height = total + values, max(height, below + 1)
                if total > MAX_VALUES:
                    refuse(current, f"aliases here expand to more than {MAX_VALUES:,} values; write the values out "
                                    "instead of nesting aliases")
            measured[id(current)] = (total, height)
        if len(ancestors) + measured[id(current)][1] > MAX_DEPTH:
            refuse(current, f"nested more than {MAX_DEPTH} levels deep; a config needs far fewer")
        return measured[id(current)]

    measure(node, ())


def _record_lines(node: yaml.Node, key: Key, path: Path, origins: dict[Key, str], duplicates: list[str]) -> None:
    """The file:line of every key; a key given twice in one mapping (YAML keeps the last silently) is listed."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*key, key_node.value)
            where = f"{path}:{key_node.start_mark.line + 1}"
            if child in origins:
                duplicates.append(f"{where}: {_dotted(child)} is given twice (first at {origins[child]}); YAML would keep "
                                  "only the last one: merge them into one")
            origins[child] = where
            if isinstance(key_node, yaml.ScalarNode):
                # YAML reads `2:` as the number 2, and validation names the key as it was read.
                origins.setdefault((*key, yaml.SafeLoader("").construct_object(key_node)), where)
            _record_lines(value_node, child, path, origins, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*key, index)
            origins[child] = f"{path}:{item.start_mark.line + 1}"
            _record_lines(item, child, path, origins, duplicates)


def _merge(parent: dict, child: dict, parent_origins: dict[Key, str], child_origins: dict[Key, str], key: Key = ()) -> dict:
    """child over parent, mapping by mapping; a key of the same text is the same key (a layer's '1' replaces the
    1 below it, as an override's does), but one layer that writes both keeps both, for validation to refuse."""
    merged = dict(parent)
    for name, value in child.items():
        below = next((known for known in parent if str(known) == str(name) and known not in child), name)
        inner = merged.pop(below) if below != name else merged.get(name)
        if isinstance(value, dict) and isinstance(inner, dict):
            merged[name] = _merge(inner, value, parent_origins, child_origins, (*key, name))
        else:
            merged[name] = value
            prefix = (*key, name)
            for stale in [k for k in parent_origins if k[: len(prefix)] == prefix and len(k) > len(prefix)]:
                del parent_origins[stale]
    return merged


def _layer_replaces_pairs(merged: dict, layer_train) -> None:
    """A layer that sets one key of a train pair (max_steps or num_epochs, warmup_ratio or warmup_steps) and
    not the other replaces what a layer below set for the other: `num_epochs: 3` over a parent's max_steps."""
    train = merged.get("train")
    if not isinstance(layer_train, dict) or not isinstance(train, dict):
        return
    for pair in ONE_OF:
        for mine, other in (pair, pair[::-1]):
            if layer_train.get(mine) is not None and other not in layer_train and train.get(other) is not None:
                merged["train"] = train = {**train, other: None}


def _apply_override(data: dict, origins: dict[Key, str], item: str) -> str | None:
    if "=" not in item:
        return f"override {item!r} is not KEY=VALUE (for example train.max_steps=5)"
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    parts = _override_key(dotted)
    if parts is None:
        return (f"override {item!r}: {dotted!r} is not a key; write KEY=VALUE with a dotted key such as lora.r=8, and "
                "[i] for a list position: data.sources[0].path=x")
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        return f"override {item!r}: value is not valid YAML ({getattr(exc, 'problem', exc)})"
    dropped = raw[node.end_mark.index if node is not None else 0:].strip()
    if dropped:
        quoted = shlex.quote(f"{dotted}={json.dumps(raw.strip(), ensure_ascii=False)}")
        return f"override {item!r}: YAML reads {dropped!r} as a comment and drops it; quote the value: {quoted}"
    return _set(data, origins, item, parts, value)


def _override_key(dotted: str) -> list[str | int] | None:
    """An override's key: a name per dot, a list position per [i] (data.sources[0].path); None when it is not one."""
    parts: list[str | int] = []
    for piece in dotted.split("."):
        match = KEY_PIECE.fullmatch(piece)
        if match is None:
            return None
        parts += [match[1], *(int(i) for i in re.findall(r"\d+", match[2]))]
    return parts


def _set(data: dict, origins: dict[Key, str], item: str, parts: list[str | int], value) -> str | None:
    """Put value at the key; .i is a list position in a list and a key in a mapping, [i] a list position."""
    node: typing.Any = data
    key: list[str | int] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not (isinstance(part, int) or _position(part)):
                return f"override {item!r}: {_dotted(tuple(key))} is a list; name a position: {_dotted((*key, 0))}"
            part = int(part)
            if part > len(node) or (part == len(node) and not last):
                return f"override {item!r}: {_dotted((*key, part))} is past the end of a list of {len(node)}"
            if part == len(node):
                node.append(None)
        elif isinstance(node, dict):
            if isinstance(part, int):
                return (f"override {item!r}: {_dotted(tuple(key))} is a mapping, not a list; name its key after a dot: "
                        f"{_dotted(tuple(key))}.{part}")
            part = next((name for name in node if str(name) == part), part)
            if not last and node.get(part) is None:
                following = parts[depth + 1]
                node[part] = _default_list((*key, str(part))) if isinstance(following, int) or (
                    _position(following) and not _takes_mapping((*key, str(part)))) else {}
        else:
            return f"override {item!r}: {_dotted(tuple(key))} is not a mapping"
        key.append(part if isinstance(part, int) else str(part))
        if last:
            # A mapping merges key by key into the one it overrides, as a config's layer over its extends parent.
            replaced = node[part] if isinstance(node, list) else node.get(part)
            node[part] = (_merge(replaced, value, origins, {}, tuple(key))
                          if isinstance(value, dict) and isinstance(replaced, dict) else value)
        else:
            node = node[part]
    where = f"command line {item!r}"
    for end in range(1, len(key)):
        origins.setdefault(tuple(key[:end]), where)
    if not isinstance(value, dict):
        for replaced in [k for k in origins if k[: len(key)] == tuple(key) and len(k) > len(key)]:
            del origins[replaced]
    for inner in _keys_within(value, tuple(key)):
        origins[inner] = where
    return None


def _keys_within(value, key: Key) -> list[Key]:
    """key and the key of everything a mapping or list value holds under it."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [key] + [inner for name, child in children for inner in _keys_within(child, (*key, name))]


def _dotted(key: Key) -> str:
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _origin(key: Key, origins: dict[Key, str], default: str) -> str:
    for end in range(len(key), 0, -1):
        if key[:end] in origins:
            return origins[key[:end]]
    return default


def _describe(err: dict, origins: dict[Key, str], default: str) -> str:
    loc: Key = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-after", "literal["))))
    where = _origin(loc, origins, default)
    overridden = sorted({origin for k, origin in origins.items()
                         if k[: len(loc)] == loc and len(k) > len(loc) and origin.startswith("command line")})
    if overridden and not where.startswith("command line"):
        where = f"{', '.join(overridden)} (over {where})"
    key = _dotted(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = _did_you_mean(loc)
        return f"{where}: {key}: unknown key{hint}"
    if kind == "invalid_key":
        within = f"{_dotted(loc[:-1])}: " if loc[:-1] else ""
        read = err.get("input")
        where = origins.get((*loc[:-1], read), where) if isinstance(read, typing.Hashable) else where
        kind = ("true/false" if isinstance(read, bool) else "a number" if isinstance(read, (int, float))
                else "null" if read is None else f"a {type(read).__name__}")
        shown = yaml.safe_dump(read).splitlines()[0] if isinstance(read, typing.Hashable) else repr(read)
        return f"{where}: {within}{shown} is not a key here: YAML reads it as {kind}, and keys are names{_known_keys(loc)}"
    if kind == "missing":
        return f"{where}: {key}: required key is missing ({_field_doc(loc)})"
    message = err["msg"].removeprefix("Value error, ")
    shown = err.get("input")
    if kind == "string_type" and isinstance(shown, dict):
        return (f"{where}: {key}: text is wanted, and YAML read a mapping ({shown!r}) as ': ' makes one; quote the "
                "value to mean the text")
    seen = "" if isinstance(shown, dict) else f" (got {shown!r})"
    return f"{where}: {key}: {message}{seen}"


def model_at(key: Key) -> type[BaseModel] | None:
    """The config section at key (list positions skipped), or None where key names no section."""
    cls: type[BaseModel] = RunConfig
    for part in key:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        inner = _inner_model(field.annotation)
        if inner is None:
            return None
        cls = inner
    return cls


def _position(part: str) -> bool:
    """A list position written after a dot: ASCII digits (str.isdigit also takes '²')."""
    return part.isascii() and part.isdigit()


def _takes_mapping(key: Key) -> bool:
    """Whether the config field at key takes a mapping (classification.class_weights), where a number after it is
    a key and not a list position."""
    model = model_at(key[:-1])
    field = model.model_fields.get(str(key[-1])) if model else None
    return field is not None and _admits_dict(field.annotation)


def _default_list(key: Key) -> list:
    """A copy of the list the config field at key holds by default (lora.target_modules: q, k, v and o), so that
    an override of one position changes that position of it; empty where the default is no list."""
    model = model_at(key[:-1])
    field = model.model_fields.get(str(key[-1])) if model else None
    default = field.get_default(call_default_factory=True) if field is not None else None
    return copy.deepcopy(list(default)) if isinstance(default, (list, tuple)) else []


def _admits_dict(annotation) -> bool:
    return typing.get_origin(annotation) is dict or any(_admits_dict(arg) for arg in typing.get_args(annotation))


def _inner_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(loc: Key) -> str:
    meant = alias_of(str(loc[-1]))
    if meant is not None and meant != _dotted(loc):
        return f"; did you mean {meant!r}? ({loc[-1]} is what fine-tuning scripts call it)"
    model = model_at(loc[:-1])
    if model is None:
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {_dotted((*loc[:-1], close[0]))!r}?"
    return _known_keys(loc)


def _known_keys(loc: Key) -> str:
    model = model_at(loc[:-1])
    return f"; known keys here: {', '.join(model.model_fields)}" if model is not None else ""


def _field_doc(loc: Key) -> str:
    model = model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model else None
    return field.description if field and field.description else "see `loraforge config schema`"
