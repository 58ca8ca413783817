"""Shared measuring helpers of the benchmarks: fp32 evaluation, matmul peak, FLOPs per token."""

import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


def cpu_tag(cpuinfo: str | None = None) -> str:
    """The CPU as vendor-family-model (amd-25-17, intel-6-106) from /proc/cpuinfo, else the machine's architecture."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if {"vendor_id", "cpu family", "model"} <= fields.keys():
        vendor = VENDORS.get(fields["vendor_id"], fields["vendor_id"].lower())
        return f"{vendor}-{fields['cpu family']}-{fields['model']}"
    return platform.machine().lower() or "cpu"


def result_stem(prefix: str = "") -> str:
    """A result file's name without suffix: [prefix-]date-cpu, so that machines measured on one day keep their own;
    a run under ONEDNN_MAX_CPU_ISA (oneDNN capped, e.g. to emulate bf16) says so in its name."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{prefix}{date.today().isoformat()}-{cpu_tag()}" + (f"-onednn-{capped.lower()}" if capped else "")


def new_result(prefix: str = "", suffixes: tuple[str, ...] = (".json", ".md"), folder: Path = RESULTS) -> Path:
    """folder/<result_stem> where no file of these suffixes exists yet: a second run on the same day and CPU is
    written beside the first (-2, -3, ...), never over it. Add a suffix to the returned path to name a file."""
    stem, n = result_stem(prefix), 1
    while any((folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}").exists() for suffix in suffixes):
        n += 1
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}{'' if n == 1 else f'-{n}'}"


def fp32_eval_loss(adapter_dir: Path, config) -> float:
    """Eval loss of an adapter on the config's validation split, base in fp32, the same for every run."""
    import torch
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    from loraforge.data.packing import collator
    from loraforge.model.load import load_model
    from loraforge.training.prepare import prepare

    data = prepare(config.model_copy(update={"data": config.data.model_copy(update={"packing": False})}))
    tokenizer = data.tokenizer
    base = load_model(data.model_path, dtype="fp32")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=8, report_to="none",
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, eval_dataset=data.val, data_collator=collator(tokenizer, packed=False))
    return trainer.evaluate()["eval_loss"]


def matmul_peak_gflops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def model_parameters(model_name: str) -> tuple[int, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.model.sources import resolve_model

    path = resolve_model(model_name)
    config = AutoConfig.from_pretrained(path)
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config


def flops_per_token(n_params: int, config, mean_length: float) -> float:
    """≈ 4·N (frozen-base LoRA: forward 2·N, backward to the activations 2·N, no base weight gradients)
    + attention 8·L·s·d (QKᵀ and AV: 4·L·s·d forward, as much again backward), s the mean sequence length."""
    return 4 * n_params + 8 * config.num_hidden_layers * mean_length * config.hidden_size
