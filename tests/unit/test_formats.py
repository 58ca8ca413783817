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
