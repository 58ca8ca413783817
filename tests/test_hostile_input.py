"""Careless and hostile input through the CLI, as a subprocess: each case answers with a message that names
the thing and the fix, exits as stated, and changes no file it did not create (hashes before and after)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ECHO_ROWS, write_jsonl

pytestmark = pytest.mark.integration


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """A config on the tiny llama and a finished run of it (4 steps, checkpoints at 2 and 4)."""
    from loraforge.config import load_config
    from loraforge.train.run import run_training

    root = tmp_path_factory.mktemp("hostile")
    data = write_jsonl(root / "echo.jsonl", ECHO_ROWS)
    config = root / "tiny.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\nlora: {{r: 4, alpha: 8}}\n"
                      f"data: {{sources: [{{path: {data}}}], val_fraction: 0.25, cache: false}}\n"
                      "train: {max_steps: 4, batch_size: 4, eval_every: 2, save_every: 2, keep_last: 5}\n"
                      "eval: {sample_prompts: [Echo red], max_new_tokens: 2}\nreport_to: []\n", encoding="utf-8")
    run_training(load_config(config, [f"output_dir={root / 'finished'}"]))
    return root, config


def copy_run(workspace, name: str) -> Path:
    root, _ = workspace
    target = root / name
    shutil.copytree(root / "finished", target)
    return target


def case_duplicate_keys(tmp_path, workspace):
    bad = tmp_path / "dup.yaml"
    bad.write_text("train:\n  max_steps: 3\ndata:\n  sources: [{path: d.jsonl}]\ntrain:\n  batch_size: 2\n")
    return ["config", "validate", bad], tmp_path, 2, [f"{bad}:5: train is given twice (first at {bad}:1)"]


def case_not_utf8(tmp_path, workspace):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 4\n# caf\xe9\n".encode("latin-1"))
    return ["config", "validate", bad], tmp_path, 2, [f"{bad}:2: not UTF-8 text", "save the file as UTF-8"]


def case_config_is_a_directory(tmp_path, workspace):
    return ["train", tmp_path], tmp_path, 2, [f"config {tmp_path} is a directory"]


def case_output_dir_holds_other_files(tmp_path, workspace):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    _, config = workspace
    return (["train", config, f"output_dir={mine}"], tmp_path, 2,
            [f"output_dir {mine} already holds files loraforge did not write", "metrics.jsonl, report.md"])


def case_output_dir_is_a_file(tmp_path, workspace):
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    _, config = workspace
    return ["train", config, f"output_dir={taken}"], tmp_path, 2, [f"output_dir {taken} is a file"]


def case_merge_into_a_foreign_folder(tmp_path, workspace):
    run = copy_run(workspace, f"merge-{tmp_path.name}")
    target = tmp_path / "models"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}\n')
    return (["merge", run, "--out", target], tmp_path, 2,
            [f"--out {target} already holds files loraforge did not write (config.json)"])


def case_resume_a_finished_run(tmp_path, workspace):
    run = copy_run(workspace, f"finished-{tmp_path.name}")
    _, config = workspace
    return (["train", config, f"output_dir={run}", "--resume", "auto"], run, 2,
            [f"{run} is already complete at step 4", "raise train.max_steps above 4"])


def case_unknown_target_module(tmp_path, workspace):
    _, config = workspace
    out = tmp_path / "run"
    return (["train", config, f"output_dir={out}", "lora.target_modules=[q_proj, qq_proj]"], tmp_path, 2,
            ["lora.target_modules: ['qq_proj'] are not modules of this model", "'q_proj'"])


def case_misspelt_builtin_model(tmp_path, workspace):
    _, config = workspace
    return (["train", config, f"output_dir={tmp_path / 'run'}", "model.name=smollm2-135m-instrct"], tmp_path, 2,
            ["model.name: 'smollm2-135m-instrct' is not a built-in model", "did you mean 'smollm2-135m-instruct'?"])


def case_template_path_naming_no_file(tmp_path, workspace):
    _, config = workspace
    return (["data", "preview", config, "data.chat_template=my_template"], tmp_path, 2,
            ["data.chat_template: 'my_template' is neither a Jinja template", "nor a file"])


@pytest.mark.parametrize("case", [case_duplicate_keys, case_not_utf8, case_config_is_a_directory,
                                  case_output_dir_holds_other_files, case_output_dir_is_a_file,
                                  case_merge_into_a_foreign_folder, case_resume_a_finished_run,
                                  case_unknown_target_module, case_misspelt_builtin_model,
                                  case_template_path_naming_no_file],
                         ids=lambda case: case.__name__.removeprefix("case_"))
def test_refused_with_a_message_and_nothing_written(case, tmp_path, workspace):
    args, watched, code, messages = case(tmp_path, workspace)
    before = digest(watched)
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for message in messages:
        assert message in done.stderr, done.stderr[-3000:]
    assert digest(watched) == before, "a refused command changed files"


@pytest.mark.parametrize("damage, said", [
    (lambda checkpoint: (checkpoint / "optimizer.pt").unlink(), "optimizer.pt missing"),
    (lambda checkpoint: (checkpoint / "COMPLETE").write_text("{not json"), "is not the JSON loraforge writes"),
], ids=["optimizer-missing", "corrupt-marker"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(workspace, tmp_path, damage, said):
    run = copy_run(workspace, f"damaged-{tmp_path.name}")
    damage(run / "checkpoints" / "checkpoint-4")
    _, config = workspace
    done = cli("train", config, f"output_dir={run}", "train.max_steps=6", "--resume", "auto", "--allow-changes",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping {run / 'checkpoints' / 'checkpoint-4'} for an earlier checkpoint: " in done.stderr
    assert said in done.stderr
    assert f"resuming from {run / 'checkpoints' / 'checkpoint-2'}" in done.stderr
    assert json.loads((run / "manifest.json").read_text())["steps"] == 6
