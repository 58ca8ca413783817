"""bitsandbytes quantization of the frozen base for QLoRA."""

import logging

log = logging.getLogger(__name__)


def bnb_config(mode: str, quant_type: str, double_quant: bool, compute_dtype):
    """A transformers BitsAndBytesConfig for mode 4bit or 8bit, or None for none."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
