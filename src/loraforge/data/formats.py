"""One pure function per data format, each turning a row into the canonical Conversation.

Each takes the row, where it came from ("file.jsonl:12") and the source's settings (field names, role
names, labels); a bad row raises DataError naming where, the field and the fix.
"""

import json
from dataclasses import dataclass

from loraforge.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool | None = None


@dataclass(frozen=True)
class Conversation:
    """A chat (`messages`) or, for plain-text training, a single `text` trained on every token."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    label: str | None = None

    def with_system(self, prompt: str | None) -> "Conversation":
        if prompt is None or self.text is not None or (self.messages and self.messages[0].role == "system"):
            return self
        return Conversation(messages=(Message("system", prompt), *self.messages), label=self.label)


def _column(source, name: str) -> str:
    fields = getattr(source, "fields", None) or {}
    return fields.get(name, name)


def _hint(source, fmt: str) -> str:
    return f"format={fmt}; map other column names with data.sources[].fields"


def from_messages(row: dict, where: str, source=None) -> Conversation:
    key = _column(source, "messages")
    items = _field(row, key, list, where, _hint(source, "messages"))
    return _checked(_message_list(items, key, where), where, key)


def _message_list(items: list, key: str, where: str) -> tuple[Message, ...]:
    out = []
    for index, item in enumerate(items):
        at = f"{where}: {key}[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} is {type(item).__name__}, expected an object with role and content")
        role = _field(item, "role", str, at, "each message needs a role")
        content = _field(item, "content", str, at, "each message needs text content")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        train = item.get("train")
        if train is not None and not isinstance(train, bool):
            raise DataError(f"{at}: field 'train' is {type(train).__name__}, expected true or false")
        out.append(Message(role, content, train))
    return tuple(out)


def from_sharegpt(row: dict, where: str, source=None) -> Conversation:
    key = _column(source, "conversations")
    roles = {**SHAREGPT_ROLES, **(getattr(source, "roles", None) or {})}
    items = _field(row, key, list, where, _hint(source, "sharegpt"))
    out = []
    for index, item in enumerate(items):
        at = f"{where}: {key}[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} is {type(item).__name__}, expected an object with from and value")
        speaker = _field(item, "from", str, at, "each turn needs a speaker in 'from'")
        value = _field(item, "value", str, at, "each turn needs text in 'value'")
        if speaker not in roles:
            raise DataError(
                f"{at}: unknown speaker {speaker!r} (known: {', '.join(sorted(roles))}); "
                f"map it with data.sources[].roles, e.g. roles: {{{speaker}: assistant}}"
            )
        out.append(Message(roles[speaker], value))
    return _checked(tuple(out), where, key)


def from_alpaca(row: dict, where: str, source=None) -> Conversation:
    hint = _hint(source, "alpaca")
    instruction = _field(row, _column(source, "instruction"), str, where, hint)
    input_key = _column(source, "input")
    extra = row.get(input_key) or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field {input_key!r} is {type(extra).__name__}, expected text; {hint}")
    output = _field(row, _column(source, "output"), str, where, hint)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _checked((Message("user", prompt), Message("assistant", output)), where, _column(source, "output"),
                    answer_only=True)


def from_prompt_completion(row: dict, where: str, source=None) -> Conversation:
    hint = _hint(source, "prompt_completion")
    prompt = _field(row, _column(source, "prompt"), str, where, hint)
    completion = _field(row, _column(source, "completion"), str, where, hint)
    return _checked((Message("user", prompt), Message("assistant", completion)), where, _column(source, "completion"),
                    answer_only=True)


def from_classification(row: dict, where: str, source=None) -> Conversation:
    hint = _hint(source, "classification")
    text = _field(row, _column(source, "text"), str, where, hint)
    label_key = _column(source, "label")
    if label_key not in row:
        _field(row, label_key, str, where, hint)
    label = row[label_key]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{where}: field {label_key!r} is {type(label).__name__}, expected a label name; {hint}")
    label = str(label)
    allowed = getattr(source, "labels", None)
    if allowed is not None and label not in allowed:
        raise DataError(
            f"{where}: label {label!r} is not in the label set {allowed}; fix the row or add it to data.sources[].labels"
        )
    if not text.strip():
        raise DataError(f"{where}: field {_column(source, 'text')!r} is empty")
    return Conversation(messages=(Message("user", text), Message("assistant", label)), label=label)


def from_text(row: dict, where: str, source=None) -> Conversation:
    key = _column(source, "text")
    text = _field(row, key, str, where, _hint(source, "text"))
    if not text.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return Conversation(text=text)


@dataclass(frozen=True)
class Preference:
    """A prompt (the messages before the answer) with a chosen and a rejected answer (assistant turns)."""

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]

    def with_system(self, prompt: str | None) -> "Preference":
        if prompt is None or (self.prompt and self.prompt[0].role == "system"):
            return self
        return Preference((Message("system", prompt), *self.prompt), self.chosen, self.rejected)

    def answers(self) -> dict[str, tuple[Message, ...]]:
        return {"chosen": self.chosen, "rejected": self.rejected}


def _turns(value, key: str, where: str, default_role: str, source) -> tuple[Message, ...]:
    """A string (one message of default_role) or a list of {role, content} messages, also as JSON text (a CSV cell)."""
    if isinstance(value, str):
        decoded = _json_list(value)
        if isinstance(decoded, list) and all(isinstance(item, dict) and "role" in item for item in decoded):
            value = decoded
    if isinstance(value, str):
        return (Message(default_role, value),)
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, expected text or a list of messages; "
                        f"{_hint(source, 'preference')}")
    return _message_list(value, key, where)


def _prompt(row: dict, where: str, source, fmt: str) -> tuple[Message, ...]:
    """The `prompt` field, or `messages` where there is no prompt: text or messages ending on a user turn."""
    prompt_key = _column(source, "prompt")
    if prompt_key not in row and _column(source, "messages") in row:
        prompt_key = _column(source, "messages")
    if prompt_key not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no {_column(source, 'prompt')!r} or {_column(source, 'messages')!r} field "
                        f"(keys: {keys}); {_hint(source, fmt)}")
    prompt = _turns(row[prompt_key], prompt_key, where, "user", source)
    if not prompt or prompt[-1].role != "user":
        raise DataError(f"{where}: field {prompt_key!r} must end on a user turn, the one the answers reply to")
    return prompt


def _answer(row: dict, name: str, prompt: tuple[Message, ...], where: str, source, fmt: str) -> tuple[Message, ...]:
    """An answer field: text, assistant messages, or the whole conversation with the prompt repeated first."""
    key = _column(source, name)
    if key not in row:
        _field(row, key, str, where, _hint(source, fmt))
    turns = _turns(row[key], key, where, "assistant", source)
    if prompt and turns and turns[: len(prompt)] == prompt and len(turns) > len(prompt):
        turns = turns[len(prompt):]
    if not turns or any(m.role != "assistant" for m in turns):
        raise DataError(f"{where}: field {key!r} must hold the assistant answer only (text, or assistant messages)")
    if not any(m.content.strip() for m in turns):
        raise DataError(f"{where}: field {key!r} is empty; fill it in or drop the row")
    return turns


def from_preference(row: dict, where: str, source=None) -> Preference:
    """{prompt, chosen, rejected}, each text or messages, or {messages, chosen, rejected} (messages = the prompt)."""
    prompt = _prompt(row, where, source, "preference")
    chosen, rejected = (_answer(row, name, prompt, where, source, "preference") for name in ("chosen", "rejected"))
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are the same answer, so the pair teaches nothing; drop the row")
    return Preference(prompt, chosen, rejected)


@dataclass(frozen=True)
class Unpaired:
    """A prompt with one answer (assistant turns) labelled desirable or not: KTO's unpaired preference example."""

    prompt: tuple[Message, ...]
    completion: tuple[Message, ...]
    desirable: bool

    def with_system(self, prompt: str | None) -> "Unpaired":
        if prompt is None or (self.prompt and self.prompt[0].role == "system"):
            return self
        return Unpaired((Message("system", prompt), *self.prompt), self.completion, self.desirable)

    def answers(self) -> dict[str, tuple[Message, ...]]:
        return {"completion": self.completion}


def from_unpaired_preference(row: dict, where: str, source=None) -> Unpaired:
    """{prompt, completion, label}: prompt and completion text or messages ({messages, ...} for the prompt too),
    label true for a desirable answer and false for an undesirable one (also as the text true or false: a CSV cell)."""
    prompt = _prompt(row, where, source, "unpaired_preference")
    completion = _answer(row, "completion", prompt, where, source, "unpaired_preference")
    key = _column(source, "label")
    label = _field(row, key, object, where, _hint(source, "unpaired_preference"))
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise DataError(f"{where}: field {key!r} is {label!r}; write true (a desirable answer) or false (an "
                        "undesirable one)")
    return Unpaired(prompt, completion, label)


# The fields each format reads from a row (data.sources[].fields renames them), and its parser.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
    "preference": ("prompt", "messages", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "messages", "completion", "label"),
}

# Fields a format reads where a row has them and goes without elsewhere.
OPTIONAL_FIELDS = {"alpaca": ("input",)}


def missing_optional_fields(source, columns: set[str], name: str) -> list[str]:
    """Warnings for an optional field that no row of a source has (its columns) while a column no field reads is
    there: Dolly's `context` is alpaca's input under another name. One that data.sources[].fields maps is an error."""
    fmt = source.format.value
    read = {_column(source, field) for field in FORMAT_FIELDS[fmt]}
    unread = sorted(map(str, columns - read))
    warnings = []
    for field in OPTIONAL_FIELDS.get(fmt, ()):
        column = _column(source, field)
        if column in columns:
            continue
        if field in (getattr(source, "fields", None) or {}):
            raise DataError(f"{name}: no row has the column {column!r} that data.sources[].fields maps to {field} "
                            f"(columns: {', '.join(sorted(map(str, columns)))}); fix fields.{field}")
        if unread:
            warnings.append(f"{name}: no row has an {field!r} column, so format {fmt} reads none, and no field reads "
                            f"the column {', '.join(map(repr, unread))}; if that is the {field}, map it: "
                            f"data.sources[].fields: {{{field}: {unread[0]}}}")
    return warnings


# Formats of preference methods: pairs (every method) and unpaired, labelled answers (method kto).
PREFERENCE_FORMATS = frozenset({"preference", "unpaired_preference"})

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

PARSERS = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "classification": from_classification,
    "text": from_text,
    "preference": from_preference,
    "unpaired_preference": from_unpaired_preference,
}


# The fields a row must have to be read in each format, for naming the format a row of another one is in.
REQUIRED_FIELDS = {
    "messages": {"messages"},
    "sharegpt": {"conversations"},
    "alpaca": {"instruction", "output"},
    "prompt_completion": {"prompt", "completion"},
    "classification": {"text", "label"},
    "text": {"text"},
    "preference": {"chosen", "rejected"},
    "unpaired_preference": {"completion", "label"},
}


# The field a format's rows open with: a row without it is more likely of another format than missing one field.
LEADING_FIELDS = {"messages", "conversations", "instruction", "prompt", "text", "chosen"}


def format_of(keys) -> str | None:
    """The format whose required fields a row with these keys has, the most specific first; None if none."""
    matching = [name for name, needed in REQUIRED_FIELDS.items() if needed <= set(keys)]
    return max(matching, key=lambda name: len(REQUIRED_FIELDS[name]), default=None)


def _field(row: dict, name: str, kind: type, where: str, hint: str):
    if name not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        other = format_of(row) if name in LEADING_FIELDS else None
        if other is not None:
            hint = f"these are the fields of format {other}: set data.sources[].format: {other}, or {hint}"
        raise DataError(f"{where}: no {name!r} field (keys: {keys}); {hint}")
    value = row[name]
    if kind is list and isinstance(value, str):
        value = _json_list(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected {kind.__name__}; {hint}")
    return value


def _json_list(text: str) -> list | str:
    """A list written as JSON text (a CSV cell is text), or the text itself when it is not one."""
    if not text.lstrip().startswith("["):
        return text
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return text
    return items if isinstance(items, list) else text


def _checked(messages: tuple[Message, ...], where: str, key: str, answer_only: bool = False) -> Conversation:
    """answer_only: key is the text field of the one answer (alpaca's output), not a list of messages."""
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: field {key!r} has no assistant message, so nothing to train on")
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.content.strip():
            what = f"field {key!r} is empty" if answer_only else f"{key}[{index}] is an empty assistant message"
            raise DataError(f"{where}: {what}; fill it in or drop the row")
        if message.train is True and message.role != "assistant":
            raise DataError(f"{where}: {key}[{index}] is a {message.role} message with train: true; only assistant turns are trained")
    if messages[-1].role != "assistant":
        raise DataError(
            f"{where}: field {key!r} ends on a {messages[-1].role} turn that nothing answers; "
            "end each conversation with an assistant message"
        )
    return Conversation(messages=messages)
