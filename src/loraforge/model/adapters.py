"""What gets trained: a LoRA (or DoRA / rsLoRA) adapter through peft, or every weight."""

import logging
import warnings
from contextlib import contextmanager

import torch
from transformers.pytorch_utils import Conv1D

from loraforge.errors import ConfigError
from loraforge.model.targets import Modules, target_problems

log = logging.getLogger(__name__)


@contextmanager
def peft_wrapping():
    """PEFT asks the model it wraps for is_gradient_checkpointing, which transformers 5 answers with a FutureWarning
    (use is_activation_checkpointing) that the user can do nothing about; it is kept out of their output here, and
    only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(
    model,
    r: int,
    alpha: float,
    dropout: float,
    target_modules,
    bias: str,
    use_dora: bool = False,
    use_rslora: bool = False,
    modules_to_save: list[str] | None = None,
    task: str = "causal_lm",
    quantized: bool = False,
    gradient_checkpointing: bool = False,
):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias=bias,
        use_dora=use_dora,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        # A trained copy of a tied layer (lm_head with tied embeddings) must stay tied to its twin.
        ensure_weight_tying=bool(modules_to_save),
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )
    problems = target_problems(loaded_modules(model), target_modules, modules_to_save)
    if problems:
        raise ConfigError(problems)
    try:
        with peft_wrapping():
            return get_peft_model(model, config)
    except ValueError as exc:  # a target peft cannot wrap: a norm, a whole block
        raise ConfigError([f"lora.target_modules: {str(exc).splitlines()[0]}; name linear layers (q_proj, v_proj, ...) "
                           "or use all-linear"]) from None


def loaded_modules(model) -> Modules:
    """The modules of a loaded model, as model/targets.py checks names against them."""
    # GPT-2 and its kin keep their projections in transformers' Conv1D, which LoRA targets as it does Linear.
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, (torch.nn.Linear, Conv1D))})
    return Modules({name for name, _ in model.named_modules()}, linear,
                   bool(getattr(model.config, "tie_word_embeddings", False)))


def trained_in_fp32(model):
    """Every weight the adapter trains in fp32, over a base in bf16: besides LoRA's own (which peft keeps in fp32),
    the full layers trained beside it (modules_to_save, a classification head, biases) are copies in the base's
    dtype, where small Adam updates round away (at lr 2e-5 most entries of a bf16 lm_head never move)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def load_trainable_adapter(model, adapter_dir, dropout: float, quantized: bool = False,
                           gradient_checkpointing: bool = False):
    """A saved LoRA adapter on the model, its weights trainable, to carry training on from it with this run's
    dropout (not the dropout the adapter was trained with)."""
    from peft import PeftConfig, PeftModel, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    settings = PeftConfig.from_pretrained(str(adapter_dir))
    settings.lora_dropout = dropout
    with peft_wrapping():
        return PeftModel.from_pretrained(model, str(adapter_dir), config=settings, is_trainable=True)


def make_fully_trainable(model):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
