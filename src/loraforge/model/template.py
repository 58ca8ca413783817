"""Chat templates: where a tokenizer's template came from, and rendering it with a time limit and errors that
name it.

Templates are Jinja programs, written by users (data.chat_template) and shipped in model folders.
transformers renders them in Jinja's sandbox; a template can still loop for ever or fail in ways that surface
as Jinja exceptions, so every render here is bounded in time and turns a failure into one message naming the
template and the fix.
"""

import json
import signal
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import jinja2

from loraforge.errors import LoraforgeError, ModelError

RENDER_SECONDS = 10.0
_ORIGINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class TemplateError(LoraforgeError):
    """A chat template that cannot render a conversation: syntax, a refused operation, an error it raises, time."""


def template_text(value: str) -> str:
    """data.chat_template: Jinja text (it has {{ or {%), or the path of a file that holds it (any extension)."""
    if "{{" in value or "{%" in value:
        return value
    if Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    raise ModelError(f"data.chat_template: {value!r} is neither a Jinja template (no {{{{ or {{%) nor a file "
                     f"(cwd is {Path.cwd()}); give the template text or the path of a file holding it")


def set_template(tokenizer, value: str) -> None:
    """Give the tokenizer data.chat_template (text or file) in place of its own."""
    text = template_text(value)
    tokenizer.chat_template = text
    _ORIGINS[tokenizer] = (text, "data.chat_template" if text == value else f"data.chat_template ({value})")


def with_default_system(template: str, system_prompt: str) -> str:
    """The chat template, with system_prompt as the system message of a chat that brings none: data.system_prompt
    as training put it into every conversation, so a merged model or GGUF answers as `loraforge chat` does."""
    default = ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
               f"'content': {json.dumps(system_prompt, ensure_ascii=False)}}}] + messages %}}{{%- endif %}}")
    return default + template


def save_for_plain_use(tokenizer, folder: Path, system_prompt: str | None) -> None:
    """Save the tokenizer into a model folder that others load without loraforge (a merge, a full fine-tune, what
    GGUF is converted from): a chat without a system message gets the run's system prompt, as in training."""
    original = tokenizer.chat_template
    if system_prompt is not None and original:
        tokenizer.chat_template = with_default_system(original, system_prompt)
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = original


def template_origin(tokenizer) -> str:
    text, origin = _ORIGINS.get(tokenizer, (None, None))
    if origin is not None and text == tokenizer.chat_template:
        return origin
    return f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')}"


def apply_template(tokenizer, messages, **kwargs):
    """tokenizer.apply_chat_template within RENDER_SECONDS; any failure of the template is a TemplateError."""
    origin = template_origin(tokenizer)
    fix = "fix the template or set data.chat_template to one that renders these messages"
    with time_limit(RENDER_SECONDS, f"{origin} did not finish rendering one conversation in {RENDER_SECONDS:g} s "
                                    f"(a loop that does not end?); {fix}"):
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except LoraforgeError:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{origin}: line {exc.lineno}: not valid Jinja: {exc.message}; {fix}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"{origin} was stopped by the sandbox ({exc}); a chat template may only read the "
                                f"messages it is given; {fix}") from None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{origin} raised an error: {exc}; {fix}") from None
        except RecursionError:
            raise TemplateError(f"{origin} recursed too deeply; {fix}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
            raise TemplateError(f"{origin} failed: {type(exc).__name__}: {exc}; {fix}") from None


@contextmanager
def time_limit(seconds: float, message: str):
    """Raise TemplateError(message) if the body runs longer than `seconds`. Only the main thread of a process
    can take a timer signal; elsewhere, and where a timer is already set, the body runs without a limit."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TemplateError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
