"""Conversation → (input_ids, labels), with the loss mask found by rendering, not by string search.

For each assistant turn the chat is rendered up to the turn with the generation prompt, and up to the
end of the turn; the tokens between the two are the turn. That works for any chat template, with or
without generation markers. The turn is trained up to and including its end-of-turn token; template
text after it (a newline, say) is never generated, so it is not trained.
"""

from loraforge.data.formats import Conversation, Message, Preference
from loraforge.errors import DataError
from loraforge.model.template import TemplateError, apply_template

IGNORE = -100
# Text at a render boundary may tokenize differently once more text follows ("assistant: " + "pong"
# merges the space into " pong"); a divergence within this many tokens of the boundary is a merge,
# a larger one is a template that rewrites history.
_BOUNDARY = 2


def stop_token_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """The ids that end an assistant turn: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return frozenset(ids)


def render(
    conversation: Conversation, tokenizer, stop_ids: frozenset[int], masking: str = "assistant"
) -> tuple[list[int], list[int]]:
    """masking: assistant (every assistant turn not marked train: false), last_assistant, or all (every token but
    those of messages marked train: false)."""
    if conversation.text is not None:
        return _render_text(conversation.text, tokenizer)
    if masking == "all":
        return _render_all(conversation, tokenizer)
    return _render_chat(conversation, tokenizer, stop_ids, last_only=masking == "last_assistant")


def _render_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def _chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = apply_template(
        tokenizer, [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_chat(
    conversation: Conversation, tokenizer, stop_ids: frozenset[int], last_only: bool
) -> tuple[list[int], list[int]]:
    _require_template(tokenizer)
    messages = conversation.messages
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    for index, message in enumerate(messages):
        if message.role != "assistant" or message.train is False or (last_only and index != last):
            continue
        prompt = _chat_ids(tokenizer, messages[:index], add_generation_prompt=True) if index else _opening(tokenizer)
        through = _chat_ids(tokenizer, messages[: index + 1], add_generation_prompt=False)
        start = _common_prefix(prompt, through)
        end = _common_prefix(through, full)
        if start < len(prompt) - _BOUNDARY or end < len(through) - _BOUNDARY:
            raise DataError(
                f"the chat template renders message {index} differently once later messages follow it, "
                "so the assistant tokens cannot be located; this template is not supported for training"
            )
        for position in range(end - 1, start - 1, -1):
            if full[position] in stop_ids:
                end = position + 1
                break
        labels[start:end] = full[start:end]
    return full, labels


def _render_all(conversation: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    """Every token trained but those of a message marked train: false, from the end of the message before it
    through its own end."""
    _require_template(tokenizer)
    messages = conversation.messages
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    labels = list(full)
    for index, message in enumerate(messages):
        if message.train is not False:
            continue
        start = (_common_prefix(_chat_ids(tokenizer, messages[:index], add_generation_prompt=False), full) if index
                 else _before_first(tokenizer, message))
        through = _chat_ids(tokenizer, messages[: index + 1], add_generation_prompt=False)
        end = _common_prefix(through, full)
        if end < len(through) - _BOUNDARY:
            raise DataError(
                f"the chat template renders message {index} differently once later messages follow it, "
                "so its tokens cannot be located; this template is not supported for training"
            )
        labels[start:end] = [IGNORE] * (end - start)
    return full, labels


def _opening(tokenizer, role: str = "assistant") -> list[int]:
    """What a template puts before a message of `role` that opens the chat (its default system message, the role
    header): the tokens two renders of such a message share when only their content differs."""
    first, second = (_chat_ids(tokenizer, [Message(role, text)], add_generation_prompt=False) for text in ("x", "y"))
    return first[: _common_prefix(first, second)]


def _before_first(tokenizer, first: Message) -> int:
    """How many tokens a template puts before a chat's first message (its default system prompt, when the chat
    brings none): what the message renders as alone, less the tokens it adds when it follows a system message. A
    template that refuses system messages (Gemma's) has no default one, so puts nothing before. A template that
    puts the system prompt into the first turn (Llama 2's, Mistral's) tokenizes the message's text differently
    after it, so the two renders part inside the message: 0 unless the tokens before are ones any content renders
    with."""
    if first.role == "system":
        return 0
    alone = _chat_ids(tokenizer, [first], add_generation_prompt=False)
    system = [Message("system", "x")]
    try:
        after = _chat_ids(tokenizer, [*system, first], add_generation_prompt=False)
        added = after[_common_prefix(_chat_ids(tokenizer, system, add_generation_prompt=False), after):]
        opening = _opening(tokenizer, first.role)
    except TemplateError:
        return 0
    start = len(alone) - _common_prefix(alone[::-1], added[::-1])
    return start if alone[:start] == opening[:start] else 0


def render_preference(pair: Preference, tokenizer, stop_ids: frozenset[int]) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids (render_answers)."""
    prompt, (chosen, rejected) = render_answers(pair.prompt, pair.answers(), tokenizer, stop_ids)
    return prompt, chosen, rejected


def render_answers(prompt_turns: tuple[Message, ...], answers: dict[str, tuple[Message, ...]], tokenizer,
                   stop_ids: frozenset[int]) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids, the chat rendered up to the generation prompt, and each answer's: what the template
    adds after the prompt, up to and including its end-of-turn token. Every answer follows the same prompt tokens,
    the tokens a chat with the model would see."""
    _require_template(tokenizer)
    prompt = _chat_ids(tokenizer, prompt_turns, add_generation_prompt=True)
    fulls, shared = [], len(prompt)
    for name, turns in answers.items():
        full = _chat_ids(tokenizer, (*prompt_turns, *turns), add_generation_prompt=False)
        common = _common_prefix(prompt, full)
        if common < len(prompt) - _BOUNDARY:
            raise DataError(
                f"the prompt's tokens differ once the {name} answer follows it (they part at token {common} of "
                f"{len(prompt)}), so the answer would not follow the prompt a chat sees; the chat template rewrites "
                "earlier turns, which preference training does not support"
            )
        fulls.append(full)
        shared = min(shared, common)
    rendered = []
    for full in fulls:
        end = len(full)
        for position in range(len(full) - 1, shared - 1, -1):
            if full[position] in stop_ids:
                end = position + 1
                break
        rendered.append(full[shared:end])
    return prompt[:shared], rendered


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so chat data cannot be rendered; set data.chat_template "
            "(a Jinja string or .jinja file), or use format: text for plain text"
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
