"""Each model variant trains a few steps on the real built-in SmolLM2-135M-Instruct. The variants that
tests/model/test_variants.py covers on the tiny llama as well (DoRA with rsLoRA, 4- and 8-bit QLoRA, full
fine-tuning, layer variants), and exact resume (tests/training/test_lifecycle.py), run here only with the slow
tests (`make test-all`)."""

import json
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.training.run import run_training
from tests.conftest import ROOT, write_jsonl

pytestmark = pytest.mark.integration

BASE = [
    "train.max_steps=4", "train.batch_size=4", "train.eval_every=4", "train.logging_steps=2",
    "train.learning_rate=1e-3", "data.val_fraction=0.01", "eval.max_new_tokens=4", "data.cache=false",
]


def train(tmp_path, *overrides):
    config = load_config(ROOT / "configs" / "default.yaml", [*BASE, f"output_dir={tmp_path / 'run'}", *overrides])
    return config, run_training(config)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["quantization=4bit", "train.max_steps=2", "train.eval_every=2"], marks=pytest.mark.slow),
        pytest.param(["lora.use_dora=true", "lora.use_rslora=true"], marks=pytest.mark.slow),
        pytest.param(["adapter=full", "train.learning_rate=2e-5"], marks=pytest.mark.slow),
        pytest.param(["model.variant=drop_layers", "model.drop_layers=[20,21,22]"], marks=pytest.mark.slow),
        pytest.param(["precision=bf16", "train.max_steps=2", "train.eval_every=2"], marks=pytest.mark.slow),
    ],
    ids=["qlora-4bit", "dora-rslora", "full", "drop-layers", "bf16"],
)
def test_variant_learns(tmp_path, smollm_path, overrides, monkeypatch):
    monkeypatch.chdir(ROOT)
    config, result = train(tmp_path, *overrides)
    assert result.eval_after < result.eval_before


@pytest.mark.slow
def test_qlora_8bit_learns(tmp_path, smollm_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    _, result = train(tmp_path, "quantization=8bit", "train.max_steps=2", "train.eval_every=2")
    assert result.eval_after < result.eval_before


@pytest.mark.slow
def test_keep_layers_run_reloads_with_the_same_layer_count(tmp_path, smollm_path, monkeypatch):
    from loraforge.trained import load_run

    monkeypatch.chdir(ROOT)
    config, _ = train(tmp_path, "model.variant=keep_layers", "model.keep_layers=24", "train.max_steps=2", "train.eval_every=2")
    model = load_run(config.output_dir).model
    assert model.config.num_hidden_layers == 24


@pytest.mark.slow
def test_classification_on_the_builtin_model(tmp_path, smollm_path, monkeypatch):
    import random

    rng = random.Random(0)
    subjects = ["The film", "This book", "The meal", "Our trip", "The show", "That song", "The hotel", "His talk"]
    rows = [{"text": f"{rng.choice(subjects)} was {'wonderful' if i % 2 else 'terrible'}.",
             "label": "positive" if i % 2 else "negative"} for i in range(64)]
    data = write_jsonl(tmp_path / "reviews.jsonl", rows)
    monkeypatch.chdir(ROOT)
    config, result = train(
        tmp_path, "task=classification", f"data.sources=[{{path: {data}, format: classification}}]",
        "data.val_fraction=0.25", "train.max_steps=12", "train.eval_every=12", "train.batch_size=8",
    )
    report = json.loads((Path(config.output_dir) / "eval.json").read_text())
    assert report["metrics_after"]["accuracy"] >= 0.9


@pytest.mark.slow
def test_exact_resume_on_the_builtin_model(tmp_path, smollm_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import load_file

    monkeypatch.chdir(ROOT)
    common = ["train.max_steps=4", "train.save_every=2", "train.logging_steps=1", "train.eval_every=100",
              "train.batch_size=2", "data.val_fraction=0", "eval.num_samples=0", "data.cache=false"]
    straight = load_config(ROOT / "configs" / "default.yaml", [*common, f"output_dir={tmp_path / 'straight'}"])
    run_training(straight)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "straight" / "resolved.yaml", resumed_dir / "resolved.yaml")
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-2", resumed_dir / "checkpoints" / "checkpoint-2")
    resumed = load_config(ROOT / "configs" / "default.yaml", [*common, f"output_dir={resumed_dir}"])
    run_training(resumed, resume="auto")

    def losses(run):
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

    assert losses(resumed_dir) == losses(tmp_path / "straight")[2:]
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
