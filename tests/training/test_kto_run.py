"""method: kto on the tiny llama: the pairs are unpaired into desirable and undesirable examples in a seeded
order, TRL's KTO trains them against the starting model, and the run reports rewards, the KL term and preference
accuracy on held-out pairs, and resumes exactly."""

import json
from pathlib import Path

import pytest

from loraforge import rundir
from loraforge.errors import ConfigError
from loraforge.training.run import run_training
from tests.training.test_preference_run import assert_resume_equals_a_straight_run, dpo_config_maker, records

KTO = ["method=kto", "precision=fp32"]


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("kto-run")
    config, _ = dpo_config_maker(folder, tiny_model_dir)("kto", *KTO)
    return config, run_training(config)


def test_pairs_become_shuffled_desirable_and_undesirable_examples(kto_run):
    from loraforge.training.build import unpaired
    from loraforge.training.prepare import prepare

    config, _ = kto_run
    pairs = prepare(config).train
    examples = unpaired(pairs, config.seed)
    assert len(examples) == 2 * len(pairs) == 36
    expected = sorted([(p, c, True) for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"])]
                      + [(p, r, False) for p, r in zip(pairs["prompt_ids"], pairs["rejected_ids"])])
    assert sorted(zip(examples["prompt_ids"], examples["completion_ids"], examples["label"])) == expected
    labels = examples["label"]
    assert labels != sorted(labels, reverse=True), "not every desirable example first: KTO samples in order"
    assert all(True in labels[i : i + 8] and False in labels[i : i + 8] for i in range(0, 32, 8))
    assert unpaired(pairs, config.seed)["completion_ids"] == examples["completion_ids"], "the order is seeded"


def test_kto_learns_the_preference_and_reports_it(kto_run):
    config, result = kto_run
    run = Path(config.output_dir)
    logged = records(run)
    steps = [r for r in logged if "kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all("rewards/chosen" in r for r in steps)
    evals = [r for r in logged if "eval_kl" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6), "policy = reference at the start"
    assert evals[-1]["eval_rewards/margins"] > 0
    found = json.loads((run / rundir.EVAL).read_text())["preference"]
    assert found["pairs"] == 6 and found["preference_accuracy"] > 0.5, "held-out pairs, measured paired"
    assert result.preference == found and "perplexity" not in result.metrics, "a KTO loss is not a language-model loss"
    assert f"| KL to the reference (KTO) | {evals[0]['eval_kl']:.4f} | {result.metrics['kl']:.4f} |" in (
        run / rundir.REPORT).read_text()
    assert not (run / rundir.ADAPTER / rundir.REFERENCE).exists(), "the reference is the base, adapter off: no copy"
    assert result.timing["step_padded_tokens"] == expected_padded_tokens(config, steps=6), (
        "batches of consecutive rows, each with its KL batch (every prompt with the answer of the row before it)")


def expected_padded_tokens(config, steps: int) -> list[int]:
    """Per optimizer step: batches of batch_size consecutive unpaired rows (an epoch's partial last batch dropped),
    grad_accum of them a step (the epoch's last step takes what is left), each batch padded to its longest row,
    and its KL batch, prompt i with the answer of row i - 1 (the first with the last's), padded the same way."""
    from loraforge.training.build import unpaired
    from loraforge.training.prepare import prepare

    rows = unpaired(prepare(config).train, config.seed)
    size, accum = config.train.batch_size, config.train.grad_accum
    per_batch = []
    for start in range(0, len(rows) - size + 1, size):
        prompts, answers = rows["prompt_ids"][start : start + size], rows["completion_ids"][start : start + size]
        kl_answers = answers[-1:] + answers[:-1]
        per_batch.append(size * max(len(p) + len(a) for p, a in zip(prompts, answers))
                         + size * max(len(p) + len(a) for p, a in zip(prompts, kl_answers)))
    epoch = [sum(per_batch[i : i + accum]) for i in range(0, len(per_batch), accum)]
    return (epoch * steps)[:steps]


def test_kto_resume_equals_a_straight_run(tmp_path, tiny_model_dir):
    assert_resume_equals_a_straight_run(tmp_path, tiny_model_dir, KTO, ("loss", "kl"))


@pytest.mark.parametrize("overrides, expected", [
    (["train.batch_size=1"], "method kto estimates its KL term from the other rows of a batch"),
    (["lora.dropout=0.1"], "lora.dropout 0.1: method kto runs without dropout"),
    (["preference.loss_type=ipo"], "method kto has none to choose"),
])
def test_kto_settings_that_cannot_work_are_config_errors(tmp_path, tiny_model_dir, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        dpo_config_maker(tmp_path, tiny_model_dir)("never", "method=kto", *overrides)
