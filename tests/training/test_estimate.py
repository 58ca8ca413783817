"""The fit planner: its batch model against what training really computed, and the CLI."""

import pytest

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
    from loraforge.model.load import load_model_config
    from loraforge.model.precision import choose_precision

    auto = choose_precision("auto", load_model_config(str(tiny_model_dir))).chosen
    assert f"on this machine, in {auto}:" in out, "the planner measures in the precision training will pick"
    assert not (tmp_path / "runs").exists()
