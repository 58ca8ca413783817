"""The tiny llama's training config, shared by the run-lifecycle and scale-out tests."""

import json
from pathlib import Path

import pytest

from loraforge import rundir
from loraforge.config import load_config
from tests.conftest import ECHO_ROWS, write_jsonl


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "echo.jsonl", ECHO_ROWS)
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
model: {{name: {tiny_model_dir}}}
lora: {{r: 4, alpha: 8, dropout: 0.1}}
data: {{sources: [{{path: {data}}}], val_fraction: 0.25, cache: false}}
train: {{max_steps: 8, batch_size: 4, learning_rate: 0.01, eval_every: 4, logging_steps: 1, warmup_ratio: 0.0,
         save_every: 3, keep_last: 10}}
eval: {{sample_prompts: [Echo red], max_new_tokens: 2}}
report_to: []
""",
        encoding="utf-8",
    )

    def make(name, *overrides):
        return load_config(path, [f"output_dir={tmp_path / name}", *overrides]), path

    return make


def losses(run_dir):
    records = [json.loads(l) for l in (Path(run_dir) / rundir.METRICS).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


