"""The Modelfile's TEMPLATE and SYSTEM, rendered as Ollama renders a chat, give the prompt training rendered."""

import re

import pytest

from loraforge.export.ollama import modelfile
from loraforge.model.template import apply_template, with_default_system

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def go_template(text: str, data: dict) -> str:
    """The part of Go's text/template a ChatML Modelfile uses: fields, `if`, `range`, `end`, `{{-` and `-}}`."""
    tokens, pos, trim_next = [], 0, False
    for match in ACTION.finditer(text):
        literal = text[pos:match.start()]
        literal = literal.lstrip() if trim_next else literal
        tokens += [("text", literal.rstrip() if match.group(1) else literal), ("action", match.group(2))]
        pos, trim_next = match.end(), bool(match.group(3))
    tokens.append(("text", text[pos:].lstrip() if trim_next else text[pos:]))

    def parse(i):
        body = []
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                body.append(("text", value))
            elif value == "end":
                return body, i + 1
            elif value.split()[0] in ("if", "range"):
                inner, i = parse(i + 1)
                body.append((value.split()[0], value.split()[1], inner))
                continue
            else:
                body.append(("field", value))
            i += 1
        return body, i

    def run(body, dot, out):
        for node in body:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "field":
                out.append(str(dot[node[1][1:]]))
            elif node[0] == "if" and dot[node[1][1:]]:
                run(node[2], dot, out)
            elif node[0] == "range":
                for item in dot[node[1][1:]]:
                    run(node[2], item, out)
        return out

    return "".join(run(parse(0)[0], data, []))


def ollama_prompt(modelfile_text: str, messages: list[dict]) -> str:
    """Ollama's chat handling: the Modelfile's SYSTEM goes first unless the chat starts with a system message;
    consecutive messages of one role are merged, and all system texts are also joined into .System."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile_text, re.S | re.M)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}] + messages
    collated = []
    for message in messages:
        if collated and collated[-1]["Role"] == message["role"]:
            collated[-1]["Content"] += "\n\n" + message["content"]
        else:
            collated.append({"Role": message["role"], "Content": message["content"]})
    joined = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return go_template(template, {"System": joined, "Messages": collated})


CHATS = [
    [{"role": "user", "content": "Echo red"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Echo red"}],
    [{"role": "user", "content": "Echo red"}, {"role": "assistant", "content": "red"}, {"role": "user", "content": "blue"}],
]


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("chat", CHATS, ids=["user", "system-user", "user-assistant-user"])
def test_ollama_renders_the_prompt_the_run_trained_on(tokenizer, system_prompt, chat):
    text = modelfile("model-f16.gguf", tokenizer, system_prompt, ["<|im_end|>"])
    trained = tokenizer
    if system_prompt is not None:
        trained = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        trained.chat_template = with_default_system(tokenizer.chat_template, system_prompt)
    expected = apply_template(trained, chat, tokenize=False, add_generation_prompt=True)
    assert ollama_prompt(text, chat) == expected
    assert expected.count("<|im_start|>system") == 1
