"""Loss masks with the real SmolLM2 tokenizer: assistant tokens and their end-of-turn trained, nothing else."""

import copy

import pytest

from loraforge.data.formats import Conversation, from_alpaca, from_messages
from loraforge.data.render import IGNORE, render, stop_token_ids
from loraforge.errors import DataError


def spans(ids, labels):
    """Contiguous runs of trained positions, as token id lists."""
    out, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                out.append(current)
            current = []
        else:
            assert label == token, "a trained label must equal its input token"
            current.append(token)
    if current:
        out.append(current)
    return out


def chat(*pairs):
    return from_messages({"messages": [{"role": r, "content": c} for r, c in pairs]}, "test:1")


def test_only_assistant_turns_and_their_eos_are_trained(tokenizer):
    conversation = chat(("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "See you."))
    ids, labels = render(conversation, tokenizer, stop_token_ids(tokenizer))
    assert len(ids) == len(labels)
    trained = spans(ids, labels)
    assert [tokenizer.decode(s) for s in trained] == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    eos = tokenizer.eos_token_id
    assert all(s[-1] == eos for s in trained)
    assert sum(1 for t in ids if t == eos) == 5, "system, 2 user and 2 assistant turns each end with <|im_end|>"
    assert sum(1 for t, l in zip(ids, labels) if t == eos and l == eos) == 2, "only assistant end-of-turn trained"
    assert ids == tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation.messages], return_dict=False
    )


def test_system_prompt_is_rendered_and_masked(tokenizer):
    conversation = chat(("user", "Hi"), ("assistant", "Hey.")).with_system("Answer in one word.")
    ids, labels = render(conversation, tokenizer, stop_token_ids(tokenizer))
    assert "Answer in one word." in tokenizer.decode(ids)
    assert "SmolLM" not in tokenizer.decode(ids), "an explicit system prompt replaces the template default"
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["Hey.<|im_end|>"]


def test_existing_system_message_is_kept(tokenizer):
    conversation = chat(("system", "Mine."), ("user", "Hi"), ("assistant", "Hey.")).with_system("Other.")
    assert conversation.messages[0].content == "Mine."


def test_alpaca_renders_through_the_chat_template(tokenizer):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ids, labels = render(from_alpaca(row, "a.jsonl:1"), tokenizer, stop_token_ids(tokenizer))
    text = tokenizer.decode(ids)
    assert "Add the numbers.\n\n2 and 3" in text
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["5<|im_end|>"]


def test_text_format_trains_every_token_and_ends_with_eos(tokenizer):
    ids, labels = render(Conversation(text="The quick brown fox."), tokenizer, stop_token_ids(tokenizer))
    assert ids == labels
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]).strip().endswith("The quick brown fox.")


def test_template_without_generation_markers(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    conversation = chat(("user", "ping"), ("assistant", "pong"), ("user", "again"), ("assistant", "pong pong"))
    ids, labels = render(conversation, plain, stop_token_ids(plain))
    # "assistant: " + "pong" tokenizes as " pong": the boundary space goes with the answer.
    assert [plain.decode(s) for s in spans(ids, labels)] == [" pong<|im_end|>", " pong pong<|im_end|>"]


def test_template_that_rewrites_history_is_refused(tokenizer):
    unstable = copy.deepcopy(tokenizer)
    unstable.chat_template = "{% for m in messages %}{{ m['role'] }}{{ loop.length }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="renders message 1 differently"):
        render(chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), unstable, frozenset())


def test_no_chat_template_is_a_clear_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*format: text"):
        render(chat(("user", "a"), ("assistant", "b")), bare, frozenset())


def test_stop_ids_include_generation_config_eos(tokenizer):
    class GenerationConfig:
        eos_token_id = [7, 8]

    assert stop_token_ids(tokenizer, GenerationConfig()) == {tokenizer.eos_token_id, 7, 8}


def multi_turn(train_first=None):
    first = {"role": "assistant", "content": "One."}
    if train_first is not None:
        first["train"] = train_first
    return from_messages(
        {"messages": [{"role": "user", "content": "a"}, first, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "Two."}]},
        "test:1",
    )


def test_masking_last_assistant_trains_only_the_final_turn(tokenizer):
    ids, labels = render(multi_turn(), tokenizer, stop_token_ids(tokenizer), "last_assistant")
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["Two.<|im_end|>"]


def test_masking_all_trains_every_token(tokenizer):
    ids, labels = render(multi_turn(), tokenizer, stop_token_ids(tokenizer), "all")
    assert labels == ids


def test_masking_all_trains_every_token_but_messages_marked_train_false(tokenizer):
    ids, labels = render(multi_turn(train_first=False), tokenizer, stop_token_ids(tokenizer), "all")
    trained = [tokenizer.decode(s) for s in spans(ids, labels)]
    assert len(trained) == 2 and trained[0].endswith("<|im_start|>user\na<|im_end|>\n")
    assert trained[1] == "<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\nTwo.<|im_end|>\n"
    assert tokenizer.decode(ids) == trained[0] + "<|im_start|>assistant\nOne.<|im_end|>\n" + trained[1]


NO_SYSTEM_TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
# Mistral's and Llama 2's way: the system prompt opens the first user turn, so the turn's text follows "\n\n", not
# "[INST] ", and tokenizes differently ("my" for " my").
SYSTEM_IN_FIRST_TURN_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if loop.first and system is defined %}{{ '[INST] ' + system + '\n\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template, trained", [
    (None, ["<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
            "<|im_start|>assistant\nok<|im_end|>\n"]),
    (NO_SYSTEM_TEMPLATE, ["<|im_start|>assistant\nok<|im_end|>\n"]),
    (SYSTEM_IN_FIRST_TURN_TEMPLATE, [" ok<|im_end|>"]),
], ids=["chatml", "no-system", "system-in-first-turn"])
def test_masking_all_masks_a_first_message_marked_train_false_and_not_the_default_system_prompt_before_it(
        tokenizer, template, trained):
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
    quiet_user = from_messages({"messages": [{"role": "user", "content": "my secret password", "train": False},
                                             {"role": "assistant", "content": "ok"}]}, "test:1")
    ids, labels = render(quiet_user, tokenizer, stop_token_ids(tokenizer), "all")
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == trained


def test_message_marked_train_false_is_masked(tokenizer):
    ids, labels = render(multi_turn(train_first=False), tokenizer, stop_token_ids(tokenizer), "assistant")
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["Two.<|im_end|>"]
    ids, labels = render(multi_turn(), tokenizer, stop_token_ids(tokenizer), "assistant")
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["One.<|im_end|>", "Two.<|im_end|>"]


def test_an_opening_assistant_turn_trains_its_text_not_the_default_system_prompt_or_header(tokenizer):
    conversation = chat(("assistant", "Hello! How can I help?"), ("user", "Say hi"), ("assistant", "hi"))
    ids, labels = render(conversation, tokenizer, stop_token_ids(tokenizer))
    assert "SmolLM" in tokenizer.decode(ids), "the template's default system prompt is rendered"
    assert [tokenizer.decode(s) for s in spans(ids, labels)] == ["Hello! How can I help?<|im_end|>", "hi<|im_end|>"]
