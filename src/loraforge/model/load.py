"""The one place that loads models and tokenizers and picks their dtype and device."""

import logging

from loraforge.errors import ModelError

log = logging.getLogger(__name__)


def load_tokenizer(path: str, chat_template: str | None = None):
    """chat_template: a Jinja string or a path to a .jinja file that replaces the tokenizer's own."""
    from pathlib import Path

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are excluded by the attention mask and labels, never by pad id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if chat_template is not None:
        template_file = Path(chat_template)
        if chat_template.endswith(".jinja"):
            if not template_file.is_file():
                raise ModelError(f"data.chat_template: {chat_template} not found (cwd is {Path.cwd()})")
            chat_template = template_file.read_text(encoding="utf-8")
        tokenizer.chat_template = chat_template
    return tokenizer


def load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as exc:
        raise ModelError(
            f"cannot load model {path!r}: {exc}. Use a built-in name (smollm2-135m-instruct), "
            "a local folder, or a hub id while online (model.name)"
        ) from None
    return model
