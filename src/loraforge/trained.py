"""A finished run's model rebuilt as it was trained, for every command that uses a run after training (chat, eval,
predict, merge, the Python API). Kept apart from rundir.py, which the launcher and resume read without loading
any model library."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

from peft import PeftModel, prepare_model_for_kbit_training

from loraforge.config import RunConfig
from loraforge.config.schema import QuantizationConfig
from loraforge.data.render import stop_token_ids
from loraforge.errors import RunDirError
from loraforge.model.adapters import peft_wrapping
from loraforge.model.load import load_for_run, load_model, load_model_config, load_tokenizer
from loraforge.model.precision import choose_for_run
from loraforge.rundir import (ADAPTER, LABELS, MODEL, REFERENCE, TOKENIZER, base_model, check_adapter, read_config,
                             trained_precision)

log = logging.getLogger(__name__)

# The command that fits a run of each task, for refusing the wrong one.
COMMAND_FOR = {"causal_lm": "loraforge chat {run_dir}", "classification": "loraforge predict {run_dir} --text ..."}


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    model: object
    tokenizer: object
    stop_ids: frozenset[int]
    labels: list[str] | None


def load_run(run_dir: str | Path, task: str | None = None, quantized: bool = True,
             precision: str = "fp32", gpu: bool = True) -> LoadedRun:
    """The trained model of a run, rebuilt as it was trained (same base, quantization and layer variant), in eval
    mode, with the run's tokenizer, stop ids and labels.

    precision bf16 rebuilds a bf16 run as training computed it: frozen weights in bf16 (a full run's linear
    layers, which autocast computed in bf16) and the model's forward under bf16 autocast, as accelerate wraps it
    (generate() calls the inner model, outside it, as in training). fp32, the default, is how plain transformers
    serves the adapter. auto: the one of the two that chat and serve compute the run in on this machine
    (precision_here).
    task: refuse a run of another task, naming the command that fits it. quantized=False loads the base
    unquantized, as merging needs plain float weights. gpu: compute on the GPU where there is one (on_gpu)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if task is not None and config.task != task:
        raise RunDirError(f"{run_dir} is a {config.task} run; use `{COMMAND_FOR[config.task].format(run_dir=run_dir)}`")
    if precision == "auto":
        precision = precision_here(run_dir, config)
    labels = run_labels(run_dir) if config.task == "classification" else None
    if not (run_dir / TOKENIZER).is_dir():
        raise RunDirError(f"{run_dir} lacks its {TOKENIZER}/ folder (the tokenizer and chat template it trained "
                          "with); copy the run again, whole")
    try:
        tokenizer = load_tokenizer(str(run_dir / TOKENIZER))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{run_dir / TOKENIZER} cannot be loaded ({first_line(exc)}): a file in it is damaged, cut "
                          "short or missing; copy the run again, whole") from None
    model = load_trained_model(run_dir, config, precision, quantized, labels, gpu=gpu)
    if config.method != "sft" and (run_dir / ADAPTER / REFERENCE / "adapter_config.json").is_file():
        # The reference a preference run was tuned against (its starting adapter), for preference accuracy.
        model.load_adapter(str(run_dir / ADAPTER / REFERENCE), adapter_name=REFERENCE)
        model.set_adapter("default")
    stop_ids = stop_token_ids(tokenizer, model.generation_config) if config.task == "causal_lm" else frozenset()
    return LoadedRun(run_dir, config, model, tokenizer, stop_ids, labels)


def run_labels(run_dir: Path) -> list[str]:
    """A classification run's label names, in id order (labels.json), or one line on what is wrong with the file."""
    path = run_dir / LABELS
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{run_dir} lacks {LABELS} (its label names in id order); copy the run again, whole") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path} cannot be read ({first_line(exc)}): damaged or cut short; copy the run again, "
                          "whole") from None
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        raise RunDirError(f"{path} is not a list of label names as loraforge wrote it; copy the run again, whole")
    return labels


def load_trained_model(run_dir: Path, config: RunConfig, precision: str, quantized: bool = True,
                       labels: list[str] | None = None, adapter_name: str = "default", gpu: bool = True):
    """The model of load_run, in eval mode, for chat, eval and serve alike: the run's own model/ where it trained
    every weight, else its adapter (named adapter_name) on its base; precision fp32 or bf16, as load_run takes it.
    Generating from it computes as the run trained under eval/generate.py's as_trained."""
    if (run_dir / MODEL / "config.json").is_file():
        model = load_model(str(run_dir / MODEL), task=config.task, labels=labels)
        if precision == "bf16":
            linear_weights_in_bf16(model)
    else:
        as_trained = config if quantized else config.model_copy(update={"quantization": QuantizationConfig()})
        check_adapter(run_dir / ADAPTER)
        base = load_for_run(as_trained, base_model(run_dir, config), precision, labels=labels)
        if as_trained.quantization.mode != "none":
            # As training prepared it: the weights bitsandbytes does not quantize (embeddings, norms, head) in fp32.
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        try:
            with peft_wrapping():
                model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER), adapter_name=adapter_name)
        except RuntimeError as exc:
            mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
            if mismatch is None:
                raise
            raise RunDirError(f"{run_dir / ADAPTER} does not fit its base model {config.model.name} ({mismatch}): its "
                              "adapter_config.json, or the run's resolved.yaml, was edited, or the base model changed "
                              "since; copy the run again, or point model.name at the model it trained on") from None
    model.eval()
    if gpu:
        model = on_gpu(model, run_dir)
    if precision == "bf16":
        autocast_forward(model)
    return model


def on_gpu(model, run_dir: Path):
    """The model on the GPU where there is one and bitsandbytes has not put it there already; on the CPU, with a
    warning, where it does not fit in the GPU's free memory."""
    import torch

    if not gpu_here() or model.device.type != "cpu":
        return model
    try:
        return model.to("cuda")
    except torch.OutOfMemoryError:
        model = model.to("cpu")
        torch.cuda.empty_cache()
        log.warning("%s: the model does not fit in the GPU's free memory; computing on the CPU (slower). Free the "
                    "GPU, or train with quantization.mode 4bit to serve the run in less memory", run_dir.name)
        return model


def gpu_here() -> bool:
    import torch

    return torch.cuda.is_available()


def first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def precision_here(run_dir: Path, config: RunConfig) -> str:
    """fp32 or bf16, the dtype chat and serve compute the run in on this machine (model/precision.py's
    choose_for_run), logged in one line. The model computes on the GPU where there is one (on_gpu); only a bf16
    run on CPU reads the model's config, for the shapes the probe times."""
    trained = trained_precision(run_dir)
    cuda = gpu_here()
    model_config = None
    if trained == "bf16" and not cuda:
        m = config.model
        model_config = (load_model_config(str(run_dir / MODEL), trust_remote_code=m.trust_remote_code)
                        if (run_dir / MODEL / "config.json").is_file()
                        else load_model_config(base_model(run_dir, config), m.revision, m.trust_remote_code))
    choice = choose_for_run(trained, model_config, cuda=cuda)
    log.info("%s: computing in %s, %s", run_dir.name, choice.chosen, choice.reason)
    return choice.chosen


def linear_weights_in_bf16(model) -> None:
    """A full run's linear layers in bf16, the dtype bf16 autocast casts their fp32 weights to: the same numbers,
    without autocast's bf16 copy of every weight beside the fp32 one, made for each generate() call (for each
    forward outside one). The rest stays in fp32, as the run trained it, and so does an output layer whose weight
    is the embeddings'."""
    import torch

    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not (tied and module is head):
            module.to(torch.bfloat16)


def autocast_forward(model) -> None:
    """The wrapping accelerate gives a bf16 run's model while it trains (Accelerator.prepare_model)."""
    import torch
    from accelerate.utils import convert_outputs_to_fp32

    autocast = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16)
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)
