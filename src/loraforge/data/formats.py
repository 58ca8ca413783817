"""One pure function per data format, each turning a row into the canonical Conversation.

Each takes the row, where it came from ("file.jsonl:12") and the source's settings (field names, role
names, labels); a bad row raises DataError naming where, the field and the fix.
"""

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
    return _checked(tuple(out), where, key)


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
    return _checked((Message("user", prompt), Message("assistant", output)), where, _column(source, "output"))


def from_prompt_completion(row: dict, where: str, source=None) -> Conversation:
    hint = _hint(source, "prompt_completion")
    prompt = _field(row, _column(source, "prompt"), str, where, hint)
    completion = _field(row, _column(source, "completion"), str, where, hint)
    return _checked((Message("user", prompt), Message("assistant", completion)), where, _column(source, "completion"))


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


# The fields each format reads from a row (data.sources[].fields renames them), and its parser.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

PARSERS = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "classification": from_classification,
    "text": from_text,
}


def _field(row: dict, name: str, kind: type, where: str, hint: str):
    if name not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no {name!r} field (keys: {keys}); {hint}")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected {kind.__name__}; {hint}")
    return value


def _checked(messages: tuple[Message, ...], where: str, key: str) -> Conversation:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: field {key!r} has no assistant message, so nothing to train on")
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.content.strip():
            raise DataError(f"{where}: {key}[{index}] is an empty assistant message; fill it in or drop the row")
        if message.train is True and message.role != "assistant":
            raise DataError(f"{where}: {key}[{index}] is a {message.role} message with train: true; only assistant turns are trained")
    if messages[-1].role != "assistant":
        raise DataError(
            f"{where}: field {key!r} ends on a {messages[-1].role} turn that nothing answers; "
            "end each conversation with an assistant message"
        )
    return Conversation(messages=messages)
