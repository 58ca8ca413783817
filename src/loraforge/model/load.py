"""The one place that loads models and tokenizers and picks their dtype and device."""

import logging
import re

from loraforge.errors import ModelError
from loraforge.internals import keep_cpu_4bit_trainable
from loraforge.model.quantize import bnb_config
from loraforge.model.template import set_template
from loraforge.model.variants import apply_variant

log = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_tokenizer(path: str, chat_template: str | None = None, revision: str | None = None, trust_remote_code: bool = False):
    """chat_template: a Jinja string or a path to a .jinja file that replaces the tokenizer's own."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are excluded by the attention mask and labels, never by pad id, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if chat_template is not None:
        set_template(tokenizer, chat_template)
    return tokenizer


def load_model(
    path: str,
    *,
    dtype: str = "fp32",
    quantization=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    task: str = "causal_lm",
    labels: list[str] | None = None,
):
    """A causal LM (or, for task classification, a model with a classification head over `labels`).

    dtype is that of the frozen weights; quantization is a BitsAndBytesConfig or None.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if trust_remote_code:
        log.warning("model.trust_remote_code is on: running code shipped with %s", path)
    kwargs = dict(
        dtype=getattr(torch, DTYPES[dtype]),
        revision=revision,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if task == "classification":
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    quiet = NewHeadReport()
    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addFilter(quiet)
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(
            f"cannot load model {path!r}: {exc}. Use a built-in name (smollm2-135m-instruct), "
            "a local folder, or a hub id while online (model.name)"
        ) from None
    except ImportError as exc:
        raise ModelError(f"model.attn_implementation {attn_implementation!r} (or the model's own code) needs a package "
                         f"that is not installed: {str(exc).splitlines()[0]}; install it, or use sdpa") from None
    except ValueError as exc:
        kind = "sequence classification" if task == "classification" else "causal language modelling"
        raise ModelError(f"cannot load model {path!r} for {kind}: {str(exc).splitlines()[0][:300]}; use a decoder "
                         "model (llama, qwen2, mistral, gemma, phi3, ...)") from None
    finally:
        reporter.removeFilter(quiet)
    if task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model


class NewHeadReport(logging.Filter):
    """Leaves out transformers' load report when all it says is that the classification head is missing from a causal
    LM checkpoint: loraforge trains that head with the adapter, and a run's adapter brings it back."""

    HEADS = ("score", "classifier")

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # colours, in a terminal
        if "LOAD REPORT" not in text:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in text.splitlines() if "|" in line][1:]
        return not (rows and all(row[1] == "MISSING" and row[0].split(".")[0] in self.HEADS for row in rows))


def context_length(model_config) -> int:
    """The most positions the model takes: prompt and answer together."""
    return (getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
            or 2048)


def load_model_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config alone (sizes, architecture), without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise ModelError(f"model.name: {path} ships its own model code (auto_map in its config.json), which "
                             "runs only with model.trust_remote_code: true; set that if you trust this code") from None
        raise ModelError(f"cannot read the config of model {path!r}: {exc} (model.name)") from None


def load_for_run(config, path: str, precision: str = "fp32", labels: list[str] | None = None):
    """The model a run trains in `precision` (the chosen one, model/precision.py), or later serves, with the
    quantization and layer variant of its config.

    chat and serve pass the precision they compute a finished run in on this machine (trained.py precision_here).
    """
    import torch

    quant = config.quantization
    compute = quant.compute_dtype if quant.compute_dtype != "auto" else ("bf16" if precision == "bf16" else "fp32")
    # Frozen weights may be bf16; trained ones (LoRA adapters, or every weight in full fine-tuning) stay fp32.
    weights = precision if precision != "fp32" and config.adapter == "lora" else "fp32"
    if quant.mode != "none" and not torch.cuda.is_available():
        log.info("bitsandbytes %s quantization on CPU%s", quant.mode,
                 "; 8-bit matmuls run in fp16 on CPU and are slow" if quant.mode == "8bit" else "")
    model = load_model(
        path,
        dtype=weights,
        quantization=bnb_config(quant.mode, quant.quant_type, quant.double_quant, getattr(torch, DTYPES[compute])),
        revision=config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
        task=config.task,
        labels=labels,
    )
    if quant.mode == "4bit":
        keep_cpu_4bit_trainable(model)
    m = config.model
    return apply_variant(model, m.variant, m.drop_layers, m.keep_layers)
