"""`loraforge train` and `loraforge chat` on the real built-in SmolLM2-135M-Instruct, through the CLI: training as its
own process, the commands that follow it through the CLI's entry in this process (each process would import the
libraries again, ~6 s)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smollm_path) -> Path:
    out = tmp_path_factory.mktemp("builtin") / "run"
    command = [
        sys.executable, "-X", "importtime", "-m", "loraforge", "train", str(ROOT / "configs" / "default.yaml"),
        "train.max_steps=4", "train.batch_size=4", "train.eval_every=4", "train.logging_steps=2",
        "train.learning_rate=5e-4", "data.val_fraction=0.01", "eval.max_new_tokens=8", f"output_dir={out}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (out / "stdout.txt").write_text(done.stdout)
    (out / "stderr.txt").write_text(done.stderr)
    return out


def test_loss_goes_down(run_dir):
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["eval_loss_after"] < report["eval_loss_before"] - 0.1
    train_losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(train_losses) == 2


def test_the_main_job_never_imports_trl_or_bitsandbytes(run_dir):
    """TRL's import adds ~27 MB to a process and bitsandbytes' ~44 MB (README, fp32 ... what was tried); only
    preference runs and packed rows need TRL, only quantized ones bitsandbytes. The run's stderr holds Python's
    import-time table (-X importtime), one module per line; an import refused (bitsandbytes, marked absent) is a line
    of its own, without the package's modules under it."""
    imported = [line.rsplit("|", 1)[-1].strip() for line in (run_dir / "stderr.txt").read_text().splitlines()
                if line.startswith("import time:")]
    assert "transformers" in imported and "peft" in imported
    assert "trl" not in imported
    assert not [name for name in imported if name.startswith(("trl.", "bitsandbytes."))]


def test_progress_and_summary_are_shown(run_dir):
    err = (run_dir / "stderr.txt").read_text()
    out = (run_dir / "stdout.txt").read_text()
    assert "step 2/4" in err and "tok/s" in err and "ETA" in err
    assert f"Run directory: {run_dir}" in out
    assert "Eval loss:" in out and "Base:" in out and "Fine-tuned:" in out


def test_adapter_loads_with_plain_peft_and_matches(run_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.trained import load_run

    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    ours = load_run(run_dir).model
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5)
        with plain.disable_adapter():
            untouched = plain(input_ids=ids).logits
        assert not torch.allclose(untouched, ours(input_ids=ids).logits, atol=1e-4)


def test_chat_prompt_answers(run_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    from loraforge.cli import main

    # Read once, at import: the environment variable alone would not make this process offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["chat", str(run_dir), "--prompt", "What is your name?", "--max-new-tokens", "12"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


@pytest.mark.slow
def test_merge_then_gguf_on_the_builtin_model(run_dir, capsys):
    from loraforge.cli import main
    from loraforge.export.gguf import compare_generations, converter_dir

    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp converter not installed; `make setup` fetches it")
    assert main(["merge", str(run_dir)]) == 0, capsys.readouterr().err[-3000:]
    assert json.loads((run_dir / "merged" / "merge.json").read_text())["max_abs_logit_diff"] <= 1e-4
    # f16 for the comparison: q8_0 rounds the weights more.
    assert main(["export", "ollama", str(run_dir), "--type", "f16"]) == 0, capsys.readouterr().err[-3000:]
    gguf = run_dir / "export" / "model-f16.gguf"
    assert (run_dir / "export" / "Modelfile").is_file()
    rows = compare_generations(gguf, run_dir / "merged", ["What is AI?", "You are not immortal", "Tell me a joke"], 8)
    assert all(r["top1_agreement"] >= 0.85 and r["max_abs_logit_diff"] < 0.25 for r in rows), rows
    assert sum(r["model"] == r["gguf"] for r in rows) >= 2, rows


@pytest.mark.slow
def test_eval_cli_on_the_builtin_model(run_dir, capsys):
    """The tiny model runs `eval --compare-base` in make test (tests/eval/test_run.py); test_loss_goes_down checks
    the built-in model's own before/after evaluation."""
    from loraforge.cli import main

    assert main(["eval", str(run_dir), "--compare-base", "--max-samples", "3"]) == 0
    written = json.loads((run_dir / "eval" / "validation.json").read_text())
    assert written["fine_tuned"]["loss"] < written["base"]["loss"]
    assert "rouge_l" in capsys.readouterr().out
