"""The one place that loads models and tokenizers and picks their dtype and device."""

import logging

from loraforge.errors import ModelError

log = logging.getLogger(__name__)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are excluded by the attention mask and labels, never by pad id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
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
