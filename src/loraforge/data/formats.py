"""One pure function per data format, each turning a row into the canonical Conversation."""

from dataclasses import dataclass

from loraforge.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A chat (`messages`) or, for plain-text training, a single `text` trained on every token."""

    messages: tuple[Message, ...] = ()
    text: str | None = None

    def with_system(self, prompt: str | None) -> "Conversation":
        if prompt is None or self.text is not None or (self.messages and self.messages[0].role == "system"):
            return self
        return Conversation(messages=(Message("system", prompt), *self.messages))


def from_messages(row: dict, where: str) -> Conversation:
    messages = _field(row, "messages", list, where, "format=messages expects {\"messages\": [{\"role\", \"content\"}, ...]}")
    out = []
    for index, item in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} is {type(item).__name__}, expected an object with role and content")
        role = _field(item, "role", str, at, "each message needs a role")
        content = _field(item, "content", str, at, "each message needs text content")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        out.append(Message(role, content))
    return _checked(tuple(out), where)


def from_alpaca(row: dict, where: str) -> Conversation:
    hint = "format=alpaca expects instruction, optional input, and output"
    instruction = _field(row, "instruction", str, where, hint)
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' is {type(extra).__name__}, expected text")
    output = _field(row, "output", str, where, hint)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _checked((Message("user", prompt), Message("assistant", output)), where)


def from_text(row: dict, where: str) -> Conversation:
    text = _field(row, "text", str, where, "format=text expects {\"text\": \"...\"}")
    if not text.strip():
        raise DataError(f"{where}: field 'text' is empty")
    return Conversation(text=text)


PARSERS = {"messages": from_messages, "alpaca": from_alpaca, "text": from_text}


def _field(row: dict, name: str, kind: type, where: str, hint: str):
    if name not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no {name!r} field (keys: {keys}); {hint}")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected {kind.__name__}; {hint}")
    return value


def _checked(messages: tuple[Message, ...], where: str) -> Conversation:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    for index, message in enumerate(messages):
        if message.role == "assistant" and not message.content.strip():
            raise DataError(f"{where}: messages[{index}] is an empty assistant message")
    return Conversation(messages=messages)
