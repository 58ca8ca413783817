"""method: kto on the tiny llama: the pairs are unpaired into desirable and undesirable examples in a seeded
order (or rows come unpaired, format unpaired_preference), TRL's KTO trains them against the starting model, and
the run reports rewards, the KL term and preference accuracy on held-out pairs (label accuracy on held-out unpaired
rows), and resumes exactly."""

import json
from pathlib import Path

import pytest
import torch

from loraforge import rundir
from loraforge.errors import ConfigError
from loraforge.training.run import run_training
from tests.conftest import ECHO_ROWS, write_jsonl
from tests.training.test_preference_run import (PAIRS, adapter, assert_resume_equals_a_straight_run, dpo_config_maker,
                                                 records)

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
    assert result.timing["step_padded_tokens"] == planned_padded_tokens(config, steps=6), (
        "batches of consecutive rows, each with its KL batch (every prompt with the answer of the row before it)")


def planned_padded_tokens(config, steps: int) -> list[int]:
    from loraforge.training.estimate import _kto_examples, kto_step_padded_tokens

    return kto_step_padded_tokens(*_kto_examples(config), config.train.batch_size, config.train.grad_accum, steps,
                                  config.data.max_length)


def unpaired_maker(folder, tiny_model_dir):
    """KTO configs on format unpaired_preference: each pair of the DPO tests written as two labelled rows."""
    rows = [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
            for pair in PAIRS for side in ("chosen", "rejected")]
    path = write_jsonl(folder / "unpaired.jsonl", rows)
    make = dpo_config_maker(folder, tiny_model_dir)
    return rows, lambda name, *overrides: make(name, *KTO, f"data.sources=[{{path: {path}, format: unpaired_preference}}]",
                                               *overrides)[0]


@pytest.fixture(scope="module")
def unpaired_kto_run(tmp_path_factory, tiny_model_dir):
    rows, make = unpaired_maker(tmp_path_factory.mktemp("kto-unpaired-run"), tiny_model_dir)
    # 36 training rows in batches of 5 (one row left over and dropped), 2 a step, so 4 steps an epoch (the last
    # takes one batch) and 6 steps in 1.5 epochs.
    config = make("kto-unpaired", "train.batch_size=5", "train.grad_accum=2", "train.max_steps=null",
                  "train.num_epochs=1.5")
    return config, rows, run_training(config)


def test_kto_trains_unpaired_rows_in_a_seeded_order_and_reports_their_label_accuracy(unpaired_kto_run):
    from loraforge.eval.run import run_eval
    from loraforge.training.build import unpaired
    from loraforge.training.estimate import optimizer_steps
    from loraforge.training.prepare import prepare

    config, rows, result = unpaired_kto_run
    run = Path(config.output_dir)
    prepared = prepare(config)
    examples = unpaired(prepared.train, config.seed)
    assert len(examples) == len(prepared.train) == 36 and len(prepared.val) == 12, "18 and 6 prompts, 2 rows each"
    assert sorted(zip(examples["prompt_ids"], examples["completion_ids"], examples["label"])) == sorted(
        zip(prepared.train["prompt_ids"], prepared.train["completion_ids"], prepared.train["label"])), "rows kept as they are"
    assert examples["label"] != prepared.train["label"], "shuffled with the seed: KTO samples in order"
    steps = [r for r in records(run) if "kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    found = json.loads((run / rundir.EVAL).read_text())["preference"]
    assert found["rows"] == 12 and found["desirable"] == 6
    assert found["label_accuracy"] > 0.5 and found["desirable_reward"] > found["undesirable_reward"]
    assert result.preference == found and "Validation rows: label accuracy" in result.summary()
    assert run_eval(run)["preference"] == pytest.approx(found), "eval of the saved run measures what training measured"
    assert optimizer_steps(config.train, 36 // 5, 2) == (4, 6) and len(result.timing["step_padded_tokens"]) == 6
    assert result.timing["step_padded_tokens"] == planned_padded_tokens(config, steps=6), (
        "the planner's batches, across the epoch's end, its partial batch dropped")


@pytest.mark.slow
def test_sft_then_kto_from_its_adapter_starts_at_the_sft_model(tmp_path, tiny_model_dir):
    make = dpo_config_maker(tmp_path, tiny_model_dir)
    echo = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    sft, _ = make("sft", "method=sft", f"data.sources=[{{path: {echo}, format: messages}}]", "train.max_steps=2",
                  "train.learning_rate=0.05", "train.save_every=null")
    run_training(sft)
    kto, _ = make("kto-from-sft", *KTO, f"init_from={sft.output_dir}", "train.max_steps=2", "train.eval_every=2",
                  "train.save_every=null")
    result = run_training(kto)
    start, reference = adapter(sft.output_dir), adapter(kto.output_dir, rundir.REFERENCE)
    assert start.keys() == reference.keys() and all(torch.equal(start[k], reference[k]) for k in start)
    first = next(r for r in records(kto.output_dir) if r.get("step") == 0 and "eval_kl" in r)
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6), "the reference is the SFT model, not the base"
    assert result.preference["pairs"] == 6 and 0 <= result.preference["preference_accuracy"] <= 1


@pytest.mark.parametrize("overrides, expected", [
    (["train.batch_size=40"], "36 KTO training examples fill no batch of 40 .* lower train.batch_size"),
    (["train.eval_batch_size=13"], "12 KTO validation examples fill no batch of 13 .* lower train.eval_batch_size"),
])
def test_kto_splits_that_fill_no_batch_are_data_errors(tmp_path, tiny_model_dir, overrides, expected):
    from loraforge.errors import DataError

    config = unpaired_maker(tmp_path, tiny_model_dir)[1]("small", *overrides)
    with pytest.raises(DataError, match=expected):
        run_training(config)
    assert not Path(config.output_dir).exists(), "refused before the run directory is made"


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_pair_methods_refuse_unpaired_rows(tmp_path, tiny_model_dir, method):
    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Echo red", "completion": "red red", "label": True}])
    with pytest.raises(ConfigError, match=rf"method {method} trains on pairs \(format preference\), and "
                                          "unpaired_preference rows have one answer each; set method: kto"):
        dpo_config_maker(tmp_path, tiny_model_dir)("never", f"method={method}",
                                                   f"data.sources=[{{path: {path}, format: unpaired_preference}}]")


# DPO's resume (test_preference_run.py) runs the same PairLifecycle under make test, without KTO's KL rows.
@pytest.mark.slow
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


@pytest.mark.slow
def test_kl_rows_are_cut_to_max_length_as_the_planner_counts_them(tmp_path, tiny_model_dir):
    """A KL row is a prompt with another row's answer, so it can be longer than any row: with data.max_length at the
    longest row, training cuts the longer KL rows to it, and the planner counts them cut."""
    from loraforge.training.estimate import _kto_examples, kto_step_padded_tokens

    rows = [{"prompt": f"Tell me about item {i}, " * (6 if i % 2 else 1), "completion": f"Item {i} " * (1 if i % 2 else 6),
             "label": i % 3 != 0} for i in range(24)]
    source = f"data.sources=[{{path: {write_jsonl(tmp_path / 'rows.jsonl', rows)}, format: unpaired_preference}}]"
    make = dpo_config_maker(tmp_path, tiny_model_dir)
    probe, _ = make("probe", *KTO, source)
    prompts, answers = _kto_examples(probe)
    longest_row = max(len(p) + len(a) for p, a in zip(prompts, answers))
    kl_rows = [len(prompts[i]) + len(answers[i - 1 if i % 4 else i + 3]) for i in range(len(prompts) // 4 * 4)]
    assert max(kl_rows) > longest_row, "the data has KL rows longer than every row"
    config, _ = make("cut", *KTO, source, f"data.max_length={longest_row}", "train.max_steps=3", "train.eval_every=3",
                     "train.save_every=3")
    assert _kto_examples(config) == (prompts, answers), "no row is cut"
    result = run_training(config)
    assert result.timing["step_padded_tokens"] == planned_padded_tokens(config, steps=3)
    uncut = kto_step_padded_tokens(prompts, answers, 4, 1, 3, max_length=10**6)
    assert planned_padded_tokens(config, steps=3) != uncut, "the cut KL rows count for less"
