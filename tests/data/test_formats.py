import pytest

from loraforge.data.formats import Message, from_alpaca, from_messages, from_text
from loraforge.errors import DataError


def test_messages_become_a_conversation():
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "extra": 1}
    conversation = from_messages(row, "f.jsonl:3")
    assert conversation.messages == (Message("user", "a"), Message("assistant", "b"))
    assert conversation.text is None


def test_alpaca_without_input():
    conversation = from_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"}, "f.jsonl:1")
    assert conversation.messages == (Message("user", "Say hi."), Message("assistant", "hi"))


def test_alpaca_with_input():
    conversation = from_alpaca({"instruction": "Sum.", "input": "1 2", "output": "3"}, "f.jsonl:1")
    assert conversation.messages[0].content == "Sum.\n\n1 2"


def test_text():
    assert from_text({"text": "hello"}, "f.jsonl:1").text == "hello"


@pytest.mark.parametrize(
    "parse, row, expected",
    [
        (from_messages, {"prompt": "x", "answer": "y"}, r"f.jsonl:7: no 'messages' field \(keys: answer, prompt\)"),
        (from_messages, {"messages": "hi"}, r"f.jsonl:7: field 'messages' is str, expected list"),
        (from_messages, {"messages": [{"role": "bot", "content": "x"}]}, r"f.jsonl:7: messages\[0\]: unknown role 'bot'"),
        (from_messages, {"messages": [{"role": "user"}]}, r"f.jsonl:7: messages\[0\]: no 'content' field"),
        (from_messages, {"messages": [{"role": "user", "content": "x"}]}, r"f.jsonl:7: field 'messages' has no assistant message"),
        (
            from_messages,
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            r"f.jsonl:7: messages\[1\] is an empty assistant message",
        ),
        (from_alpaca, {"instruction": "x"}, r"f.jsonl:7: no 'output' field.*format=alpaca"),
        (from_alpaca, {"instruction": "x", "input": 3, "output": "y"}, r"f.jsonl:7: field 'input' is int"),
        (from_text, {"body": "x"}, r"f.jsonl:7: no 'text' field \(keys: body\)"),
        (from_text, {"text": " "}, r"f.jsonl:7: field 'text' is empty"),
    ],
)
def test_bad_rows_name_file_line_and_field(parse, row, expected):
    with pytest.raises(DataError, match=expected):
        parse(row, "f.jsonl:7")


def source(**kw):
    from loraforge.config.data_section import DataSource

    return DataSource.model_validate({"path": "f.jsonl", **kw})


def test_sharegpt_with_default_and_custom_roles():
    from loraforge.data.formats import from_sharegpt

    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    with pytest.raises(DataError, match=r"unknown speaker 'bot'.*roles: \{bot: assistant\}"):
        from_sharegpt(row, "f.jsonl:1", source(format="sharegpt"))
    conversation = from_sharegpt(row, "f.jsonl:1", source(format="sharegpt", roles={"bot": "assistant"}))
    assert conversation.messages == (Message("user", "q"), Message("assistant", "a"))


def test_prompt_completion():
    from loraforge.data.formats import from_prompt_completion

    conversation = from_prompt_completion({"prompt": "2+2=", "completion": "4"}, "f.jsonl:1")
    assert conversation.messages == (Message("user", "2+2="), Message("assistant", "4"))


def test_classification_keeps_the_label():
    from loraforge.data.formats import from_classification

    conversation = from_classification({"text": "great film", "label": 1}, "f.jsonl:1", source(format="classification"))
    assert conversation.label == "1"
    assert conversation.messages[-1] == Message("assistant", "1")


def test_field_mapping_per_source():
    row = {"question": "Capital of France?", "answer": "Paris", "context": ""}
    mapped = source(format="alpaca", fields={"instruction": "question", "output": "answer", "input": "context"})
    conversation = from_alpaca(row, "f.jsonl:1", mapped)
    assert conversation.messages == (Message("user", "Capital of France?"), Message("assistant", "Paris"))
    with pytest.raises(DataError, match=r"f.jsonl:2: no 'answer' field \(keys: output, question\)"):
        from_alpaca({"question": "x", "output": "y"}, "f.jsonl:2", mapped)


def test_field_mapping_rejects_fields_the_format_lacks():
    from loraforge.errors import ConfigError
    from loraforge.config.load import load_config

    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "c.yaml"
        path.write_text("data:\n  sources:\n    - {path: d.jsonl, format: alpaca, fields: {question: q}}\n")
        with pytest.raises(ConfigError, match=r"fields \['question'\] are not fields of format alpaca; map these: instruction, input, output"):
            load_config(path)


def test_per_message_train_flag():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    conversation = from_messages(row, "f.jsonl:1")
    assert [m.train for m in conversation.messages] == [None, False, None, None]
    with pytest.raises(DataError, match="user message with train: true"):
        from_messages({"messages": [{"role": "user", "content": "q", "train": True}, {"role": "assistant", "content": "a"}]}, "f:1")
