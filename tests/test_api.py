"""The Python API: `import loraforge` is instant, and the functions train, evaluate, generate and merge a real
(tiny) run, returning typed results that agree with the CLI."""

import ast
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import loraforge
from tests.conftest import ROOT, write_tiny_config


def test_import_is_instant_and_the_api_loads_on_first_use():
    probe = ("import sys, loraforge; assert 'torch' not in sys.modules, 'import loraforge pulled in torch'; "
             "loraforge.train; assert 'torch' in sys.modules; "
             "from huggingface_hub import constants; assert constants.HF_HUB_DISABLE_TELEMETRY, 'telemetry on'; "
             "print(sorted(n for n in dir(loraforge) if not n.startswith('_')))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_TELEMETRY"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels" not in done.stderr, "bitsandbytes' note on a hub kernel loraforge never uses, hidden as the CLI does"
    listed = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert {"evaluate", "generate", "load_config", "merge", "train", "TrainResult", "EvalResult"} <= set(listed)
    with pytest.raises(AttributeError, match="has no attribute 'trian'"):
        loraforge.trian


def test_train_evaluate_generate_and_merge_from_python(tmp_path, tiny_model_dir, capsys):
    from loraforge.cli import main

    config_file = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 3, batch_size: 4, learning_rate: 0.01, "
                                    "eval_every: 3}", max_new_tokens=4)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = loraforge.train(config_file, [f"output_dir={tmp_path / 'run'}"])
        assert isinstance(result, loraforge.TrainResult) and result.run_dir == tmp_path / "run"
        assert result.eval_after is not None and (result.run_dir / "adapter").is_dir()
        evaluated = loraforge.evaluate(result.run_dir)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)], (
        "the deprecation PEFT's wrapping sets off inside transformers is not the user's to see")
    assert isinstance(evaluated, loraforge.EvalResult) and evaluated.rows == 6
    assert evaluated.metrics["fine_tuned"]["loss"] == pytest.approx(result.eval_after, rel=0.05)
    assert evaluated.written_to == result.run_dir / "eval" / "validation.json" and evaluated.written_to.is_file()

    answers = loraforge.generate(result.run_dir, ["Echo red", "Echo blue"])
    capsys.readouterr()
    assert main(["chat", str(result.run_dir), "--prompt", "Echo blue"]) == 0
    assert answers[1] == capsys.readouterr().out.strip(), "the same greedy answer as `loraforge chat --prompt`"
    assert loraforge.generate(result.run_dir, "Echo blue") == answers[1], "one prompt, one answer"

    merged = loraforge.merge(result.run_dir)
    assert isinstance(merged, loraforge.MergeResult) and Path(merged.out_dir, "config.json").is_file()
    assert merged.max_abs_logit_diff < 1e-3

    config = loraforge.load_config(config_file, [f"output_dir={tmp_path / 'again'}"])
    with pytest.raises(TypeError, match="overrides apply to a config file"):
        loraforge.train(config, ["train.max_steps=1"])


def test_train_leaves_the_callers_environment_and_logging_as_they_were(tmp_path, tiny_model_dir, monkeypatch):
    import logging

    config_file = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1, batch_size: 4, save_every: null}")
    (tmp_path / ".env").write_text("LORAFORGE_TEST_TRACKER_KEY=from-dotenv\n", encoding="utf-8")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.delenv("LORAFORGE_TEST_TRACKER_KEY", raising=False)
    seen = {}
    from loraforge.training import run as run_module

    real = run_module.build_trainer

    def spy(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in
                     ("WANDB_PROJECT", "TENSORBOARD_LOGGING_DIR", "LORAFORGE_TEST_TRACKER_KEY")})
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "build_trainer", spy)
    level = logging.getLogger("loraforge").level
    loraforge.train(config_file, [f"output_dir={tmp_path / 'run'}", "tracking.wandb.project=theirs"])
    assert seen == {"WANDB_PROJECT": "theirs", "TENSORBOARD_LOGGING_DIR": str(tmp_path / "run" / "tensorboard"),
                    "LORAFORGE_TEST_TRACKER_KEY": "from-dotenv"}, "the run sees its own settings"
    assert os.environ["WANDB_PROJECT"] == "mine"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "LORAFORGE_TEST_TRACKER_KEY" not in os.environ
    assert logging.getLogger("loraforge").level == level


def test_star_import_gives_the_api():
    names: dict = {}
    exec("from loraforge import *", names)
    assert {"train", "evaluate", "generate", "merge", "load_config", "TrainResult"} <= set(names)


def test_api_arguments_of_the_wrong_kind_are_messages(tmp_path, tiny_model_dir):
    from loraforge.errors import ConfigError

    config_file = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1, batch_size: 4}")
    assert loraforge.load_config(config_file, None).lora.r == 4
    assert loraforge.load_config(config_file, "lora.r=8").lora.r == 8, "one string is one override"
    with pytest.raises(ConfigError, match="override 8: give KEY=VALUE text"):
        loraforge.load_config(config_file, ["lora.r=4", 8])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="max_new_tokens .*: give a whole number of 1 or more"):
            loraforge.generate(tmp_path / "not-even-a-run", "hi", max_new_tokens=bad)
