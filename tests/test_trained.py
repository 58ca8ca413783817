"""Where a finished run computes: on the GPU where there is one. Where no GPU is, one is stood in for (trained.gpu_here
says yes): the decisions are real, the move to the device is recorded instead of made."""

import json
import logging
from pathlib import Path

import pytest
import torch

from loraforge import trained
from loraforge.trained import load_run


def cuda_here(monkeypatch) -> list:
    """From here on torch says a GPU is there and takes bf16; a model moved to it stays where it is, and the moves
    are listed in the list returned."""
    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and str(args[0]) == "cuda":
            moved.append(self)
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(trained, "gpu_here", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moved


def test_an_unquantized_run_is_moved_to_the_gpu_and_merge_keeps_it_on_the_cpu(train_tiny, monkeypatch):
    """chat, eval, predict, serve and the API computed an unquantized run on the CPU beside an idle GPU."""
    config, _ = train_tiny("train.max_steps=2", "precision=fp32")
    moved = cuda_here(monkeypatch)
    run = load_run(config.output_dir, task="causal_lm")
    assert moved == [run.model]
    moved.clear()
    load_run(config.output_dir, quantized=False, gpu=False)
    assert moved == [], "merge writes from the CPU"


def test_a_model_the_gpu_has_no_room_for_computes_on_the_cpu_with_a_warning(train_tiny, monkeypatch, caplog):
    config, _ = train_tiny("train.max_steps=2", "precision=fp32")
    real_to = torch.nn.Module.to

    def no_room(self, *args, **kwargs):
        if args and str(args[0]) == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(trained, "gpu_here", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.nn.Module, "to", no_room)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        run = load_run(config.output_dir, task="causal_lm")
    assert run.model.device.type == "cpu"
    assert [r.getMessage() for r in caplog.records if "GPU" in r.getMessage()] == [
        f"{Path(config.output_dir).name}: the model does not fit in the GPU's free memory; computing on the CPU "
        "(slower). Free the GPU, or train with quantization.mode 4bit to serve the run in less memory"]


def test_a_bf16_run_computes_in_bf16_on_a_gpu_without_timing_the_cpu(train_tiny, monkeypatch):
    """precision auto for chat and serve: the GPU's answer, as for a quantized run; it was the CPU's (timed, and
    fp32 on a CPU without native bf16) for an unquantized run that then computed on the GPU."""
    config, _ = train_tiny("train.max_steps=2", "precision=fp32")
    manifest = Path(config.output_dir) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "precision": {"chosen": "bf16"}}))
    moved = cuda_here(monkeypatch)
    monkeypatch.setattr("loraforge.model.precision.choose_cpu", lambda *a: pytest.fail("timed the CPU"))
    assert trained.precision_here(Path(config.output_dir), config) == "bf16"
    run = load_run(config.output_dir, task="causal_lm", precision="auto")
    assert moved == [run.model]
