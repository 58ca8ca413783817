"""configs/dpo.yaml on the real built-in SmolLM2-135M-Instruct and the bundled pairs: held-out preference
accuracy rises clearly above the starting model's. About 20 s a DPO step on a 2-core CPU, so this runs with
the slow tests (`make test-all`); tests/training/test_preference_run.py covers DPO on the tiny llama in every run."""

import json
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.eval.run import run_eval
from loraforge.training.run import run_training
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_dpo_on_the_bundled_pairs_raises_held_out_preference_accuracy(tmp_path, smollm_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "dpo.yaml", [
        f"output_dir={tmp_path / 'dpo'}", "train.max_steps=16", "train.eval_every=16", "train.learning_rate=2e-4",
        "data.val_fraction=0.03", "eval.num_samples=0", "eval.samples_during_training=0", "data.cache=false"])
    result = run_training(config)
    found = result.preference
    assert found["pairs"] >= 50
    assert found["reward_accuracy"] >= 0.75, "the tuned margin beats the reference's on most held-out pairs"
    assert found["preference_accuracy"] >= found["start_preference_accuracy"] + 0.04, found

    again = run_eval(Path(config.output_dir))["preference"]
    assert again == pytest.approx(found), "eval of the saved run (adapter and adapter/ref) measures the same"
    assert json.loads((Path(config.output_dir) / "eval.json").read_text())["preference"] == pytest.approx(found)
