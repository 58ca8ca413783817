"""The fit planner: its batch model against what training really computed, and the CLI."""

import pytest
import torch

from loraforge.training.estimate import step_padded_tokens


@pytest.mark.parametrize("group_by_length", [True, False])
def test_padded_tokens_model_matches_training(train_tiny, group_by_length):
    from loraforge.data.build import build_datasets
    from loraforge.data.render import stop_token_ids
    from loraforge.model.load import load_tokenizer

    config, result = train_tiny("train.max_steps=10", "train.batch_size=3", "train.grad_accum=2",
                                f"train.group_by_length={str(group_by_length).lower()}", "data.val_fraction=0")
    tokenizer = load_tokenizer(config.model.name)
    lengths = [len(x) for x in build_datasets(config.data, tokenizer, stop_token_ids(tokenizer), config.seed).train["input_ids"]]
    assert len(lengths) == 24, "4 optimizer steps of 6 rows per epoch"
    predicted = step_padded_tokens(lengths, 3, 2, group_by_length, False, config.seed, 10)
    assert len(predicted) == 10
    if group_by_length:
        assert predicted == result.timing["step_padded_tokens"], "the same batches as training, across epochs"
    else:
        assert sum(predicted) == pytest.approx(sum(result.timing["step_padded_tokens"]), rel=0.25), "random order: same distribution"


def test_estimate_cli(tiny_model_dir, tmp_path, capsys):
    from loraforge.cli import main
    from tests.conftest import ECHO_ROWS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", ECHO_ROWS)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{sources: [{{path: {data}}}], cache: false}}\n"
                      "train: {max_steps: 50, batch_size: 4, eval_every: 10}\n")
    assert main(["estimate", str(config), "--probe-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "s per optimizer step" in out and "50 steps: about" in out and "MB process RSS" in out
    assert ("MB reserved by PyTorch" in out) == torch.cuda.is_available(), "GPU memory where the probe ran on a GPU"
    from loraforge.model.load import load_model_config
    from loraforge.model.precision import choose_precision

    auto = choose_precision("auto", load_model_config(str(tiny_model_dir))).chosen
    assert f"on this machine, in {auto}:" in out, "the planner measures in the precision training will pick"
    assert not (tmp_path / "runs").exists()


def test_padded_tokens_of_the_busiest_process_follow_accelerates_sharding():
    """Two processes: the batches of the length-grouped order go to the processes in turn (accelerate's own shard
    of the batch sampler, used here as the reference), grad_accum of each process's a step; a step takes as long as
    the process with more tokens in it."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from loraforge.training.trainer import SeededLengthGroupedSampler

    batch_size, grad_accum, seed = 3, 2, 11
    for rows, steps in ((24, 2), (20, 2)):
        lengths = [5 + (i * 37) % 61 for i in range(rows)]
        per_process = []
        for rank in range(2):
            batches = BatchSampler(SeededLengthGroupedSampler(batch_size * grad_accum, lengths, seed), batch_size, False)
            tokens = [len(b) * max(lengths[i] for i in b) for b in BatchSamplerShard(batches, 2, rank)]
            per_process.append([sum(tokens[k : k + grad_accum]) for k in range(0, len(tokens), grad_accum)])
        # 24 rows: 8 batches of 3, 4 rounds over 2 processes; 20 rows: 7 batches, the last of 2 rows, which
        # accelerate completes, and an eighth made of rows from the epoch's start.
        assert len(per_process[0]) == steps
        busiest = [max(a, b) for a, b in zip(*per_process)]
        assert per_process[0] != per_process[1], "the processes' shares differ, so the busiest one matters"
        assert step_padded_tokens(lengths, batch_size, grad_accum, True, False, seed, steps, processes=2) == busiest
        assert step_padded_tokens(lengths, batch_size, grad_accum, True, False, seed, steps, processes=1) != busiest


def test_a_short_run_is_estimated_in_seconds_and_a_long_one_in_minutes():
    from loraforge.training.estimate import Estimate

    short = Estimate(0.5, 20.0, 900.0, 6, 400.0, 4, "fp32").summary()
    assert "6 steps: about 20 seconds in all, evaluations and model loading included" in short
    long = Estimate(1.4, 162.0, 2039.0, 100, 440.0, 4, "fp32").summary()
    assert "100 steps: about 2.7 minutes in all" in long
