"""method: orpo on the tiny llama: one loss learns the chosen answers (their tokens only, as SFT's loss) and their
odds over the rejected ones, with no reference pass; it reports what a DPO run reports, resumes exactly (test_preference_run, stopped between logs), and
starts from an SFT run's adapter, which is then what preference accuracy is measured against."""

import json
import math
from pathlib import Path

import pytest
import torch

from loraforge import rundir
from loraforge.errors import ConfigError
from loraforge.training.run import run_training
from tests.conftest import ECHO_ROWS, write_jsonl
from tests.training.test_preference_run import adapter, dpo_config_maker, records

ORPO = ["method=orpo", "precision=fp32", "train.eval_batch_size=8"]


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("orpo-run")
    config, _ = dpo_config_maker(folder, tiny_model_dir)("orpo", *ORPO)
    return config, run_training(config)


def answer_nll(model_dir: Path, pairs) -> float:
    """Mean cross-entropy of the chosen answers' tokens given their prompts, computed here without TRL."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for prompt, chosen in zip(pairs["prompt_ids"], pairs["chosen_ids"]):
        ids = torch.tensor([prompt + chosen])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        total += torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum").item()
        count += len(chosen)
    return total / count


def test_orpo_learns_the_chosen_answers_and_the_preference(orpo_run, tiny_model_dir):
    from loraforge.training.prepare import prepare

    config, result = orpo_run
    run = Path(config.output_dir)
    logged = records(run)
    steps = [r for r in logged if "log_odds_ratio" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all("rewards/margins" in r for r in steps)
    evals = [r for r in logged if "eval_nll_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    val = prepare(config).val
    assert len(val) == 6
    assert evals[0]["eval_nll_loss"] == pytest.approx(answer_nll(tiny_model_dir, val), rel=1e-4), (
        "at step 0 the model is the base, and ORPO's SFT term covers the answers' tokens, not the prompts'")
    assert evals[-1]["eval_nll_loss"] < evals[0]["eval_nll_loss"]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]

    from loraforge.training.estimate import _train_lengths, step_padded_tokens

    predicted = step_padded_tokens(_train_lengths(config), 4, 2, True, False, config.seed, 6)
    assert result.timing["step_padded_tokens"] == [2 * t for t in predicted], (
        "tokens counted as ORPO computes them (both sides padded to one length), and as the planner predicts")
    real = json.loads((run / rundir.EVAL).read_text())["real_tokens"]
    assert 0 < real < sum(result.timing["step_padded_tokens"]) and result.tokens_per_s > 0

    found = json.loads((run / rundir.EVAL).read_text())["preference"]
    assert found["pairs"] == 6 and found["preference_accuracy"] > 0.5
    assert result.preference == found and "Validation pairs: preference accuracy" in result.summary()
    report = (run / rundir.REPORT).read_text()
    assert f"| loss of the chosen answers (ORPO) | {evals[0]['eval_nll_loss']:.4f} | {result.metrics['nll_loss']:.4f} |" in report
    assert not (run / rundir.ADAPTER / rundir.REFERENCE).exists(), "no reference adapter: the base is the start"


def test_sft_then_orpo_from_its_adapter_measures_against_the_sft_model(tmp_path, tiny_model_dir):
    from loraforge.eval.run import run_eval

    make = dpo_config_maker(tmp_path, tiny_model_dir)
    echo = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    sft, _ = make("sft", "method=sft", f"data.sources=[{{path: {echo}, format: messages}}]", "train.max_steps=2",
                  "train.save_every=null")
    run_training(sft)
    orpo, _ = make("orpo-from-sft", *ORPO, f"init_from={sft.output_dir}", "train.max_steps=2",
                   "train.eval_every=2", "train.save_every=null")
    result = run_training(orpo)
    start, reference, tuned = adapter(sft.output_dir), adapter(orpo.output_dir, rundir.REFERENCE), adapter(orpo.output_dir)
    assert start.keys() == reference.keys() and all(torch.equal(start[k], reference[k]) for k in start)
    assert any(not torch.equal(start[k], tuned[k]) for k in start), "ORPO trained on from the SFT adapter"
    assert all(math.isfinite(r["loss"]) for r in records(orpo.output_dir) if "loss" in r)
    run_eval(Path(orpo.output_dir))
    written = json.loads((Path(orpo.output_dir) / "eval" / "validation.json").read_text())["preference"]
    assert written == pytest.approx(result.preference), "eval of the saved run measures against the same start"


def test_orpo_settings(tmp_path, tiny_model_dir):
    make = dpo_config_maker(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="preference.loss_type chooses among DPO's losses; method orpo has none"):
        make("never", "method=orpo", "preference.loss_type=hinge")
    config, _ = make("dropout", "method=orpo", "lora.dropout=0.1", "train.best_metric=eval_nll_loss")
    assert config.lora.dropout == 0.1, "no reference pass, so dropout is allowed as in SFT"
