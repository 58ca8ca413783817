"""What gets trained: a LoRA (or DoRA / rsLoRA) adapter through peft, or every weight."""

import logging

import torch

from loraforge.errors import ConfigError

log = logging.getLogger(__name__)


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
    if isinstance(target_modules, list):
        names = [name for name, _ in model.named_modules()]
        unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        if unknown:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            raise ConfigError([f"lora.target_modules: {unknown} are not modules of this model; its linear layers "
                               f"are {linear} (or use all-linear)"])
    return get_peft_model(model, config)


def load_trainable_adapter(model, adapter_dir, dropout: float, quantized: bool = False,
                           gradient_checkpointing: bool = False):
    """A saved LoRA adapter on the model, its weights trainable, to carry training on from it with this run's
    dropout (not the dropout the adapter was trained with)."""
    from peft import PeftConfig, PeftModel, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    settings = PeftConfig.from_pretrained(str(adapter_dir))
    settings.lora_dropout = dropout
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
