"""Chat templates render within a time limit, and their failures become one message naming the template."""

import signal
import threading

import pytest

from loraforge.model import template
from loraforge.model.template import TemplateError, apply_template, set_template, template_origin

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
ENDLESS = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


def test_an_endless_template_is_stopped_and_the_timer_handler_restored(tokenizer, monkeypatch):
    monkeypatch.setattr(template, "RENDER_SECONDS", 0.3)
    marker = lambda signum, frame: None
    previous = signal.signal(signal.SIGALRM, marker)
    original = tokenizer.chat_template
    try:
        set_template(tokenizer, ENDLESS)
        with pytest.raises(TemplateError, match=r"data.chat_template did not finish rendering .* in 0.3 s"):
            apply_template(tokenizer, CHAT, tokenize=False)
        assert signal.getsignal(signal.SIGALRM) is marker
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        signal.signal(signal.SIGALRM, previous)
        tokenizer.chat_template = original


def test_the_model_template_renders_the_same_through_the_guard_and_off_the_main_thread(tokenizer):
    direct = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert apply_template(tokenizer, CHAT, tokenize=False) == direct
    found = []
    worker = threading.Thread(target=lambda: found.append(apply_template(tokenizer, CHAT, tokenize=False)))
    worker.start()
    worker.join(timeout=30)
    assert found == [direct], "no timer signal off the main thread, and no error either"


def test_an_undefined_variable_in_a_model_template_names_that_model(tokenizer):
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = "{{ messages[0].content | nosuchfilter }}"
        with pytest.raises(TemplateError, match=rf"the chat template of {tokenizer.name_or_path}.*nosuchfilter"):
            apply_template(tokenizer, CHAT, tokenize=False)
    finally:
        tokenizer.chat_template = original


def test_an_inline_template_longer_than_a_file_name_is_taken_as_text(smollm_path):
    from loraforge.model.load import load_tokenizer

    text = "{% for m in messages %}" + "{{ m.role }}: {{ m.content }}\n" * 40 + "{% endfor %}"
    assert len(text) > 255, "longer than a file name may be, where asking the disk about it raises"
    tokenizer = load_tokenizer(smollm_path, text)
    assert tokenizer.chat_template == text
    assert template_origin(tokenizer) == "data.chat_template"
