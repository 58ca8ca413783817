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


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the modules changed.

    On a CPU with AVX512-BF16, the first no-grad forward in eval mode (an evaluation, say) converts each
    Linear4bit weight to an inference-only layout; every later training step then gets zero gradients
    through those layers, with no error. Turning the conversion off keeps evaluation and training correct.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
