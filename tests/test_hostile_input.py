"""Careless and hostile input through the CLI, each command in its own process: each case answers with a message that names
the thing and the fix, exits as stated, and changes no file it did not create (hashes before and after)."""

import hashlib
import inspect
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ECHO_ROWS, write_jsonl, write_tiny_config

pytestmark = pytest.mark.integration
STARTUP_SECONDS = 15


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
    from loraforge.training.run import run_training

    root = tmp_path_factory.mktemp("hostile")
    config = write_tiny_config(root, tiny_model_dir, "{max_steps: 4, batch_size: 4, eval_every: 2, save_every: 2, "
                               "keep_last: 5}")
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
            [f"--out {target} holds files loraforge did not write, or that changed since it wrote them (config.json)"])


def case_resume_a_finished_run(tmp_path, workspace):
    run = copy_run(workspace, f"finished-{tmp_path.name}")
    _, config = workspace
    return (["train", config, f"output_dir={run}", "--resume", "auto"], run, 2,
            [f"{run} is already complete at step 4", "raise train.max_steps above 4"])


def case_resume_past_max_steps(tmp_path, workspace):
    run = copy_run(workspace, f"stopped-{tmp_path.name}")
    started = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({key: started[key] for key in ("data_files", "cwd")}))
    _, config = workspace
    return (["train", config, f"output_dir={run}", "train.max_steps=3", "--resume", "auto", "--allow-changes"], run, 2,
            ["checkpoint-4 is past train.max_steps=3", "train.max_steps of at least 4"])


def case_extend_a_finished_run_by_epochs(tmp_path, workspace):
    run = copy_run(workspace, f"epochs-{tmp_path.name}")
    _, config = workspace
    return (["train", config, f"output_dir={run}", "train.max_steps=null", "train.num_epochs=3", "--resume", "auto"],
            run, 2, [f"{run} is already complete at step 4", "a run counted in epochs is carried on by steps: set "
                     "train.max_steps above 4"])


def case_unknown_target_module(tmp_path, workspace):
    _, config = workspace
    out = tmp_path / "run"
    return (["train", config, f"output_dir={out}", "lora.target_modules=[q_proj, qq_proj]"], tmp_path, 2,
            [f"1 problem(s) in config {config}:\n  - command line 'lora.target_modules=[q_proj, qq_proj]': "
             "lora.target_modules: ['qq_proj'] are not modules of this model", "'q_proj'"])


def case_misspelt_builtin_model(tmp_path, workspace):
    _, config = workspace
    return (["train", config, f"output_dir={tmp_path / 'run'}", "model.name=smollm2-135m-instrct"], tmp_path, 2,
            ["model.name: 'smollm2-135m-instrct' is not a built-in model", "did you mean 'smollm2-135m-instruct'?"])


def case_template_path_naming_no_file(tmp_path, workspace):
    _, config = workspace
    return (["data", "preview", config, "data.chat_template=my_template"], tmp_path, 2,
            ["data.chat_template: 'my_template' is neither a Jinja template", "nor a file"])


def case_billion_laughs(tmp_path, workspace):
    bad = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bad.write_text("\n".join(lines) + "\n")
    return ["config", "validate", bad], tmp_path, 2, [f"{bad}:6: aliases here expand to more than 100,000 values"]


def case_alias_containing_itself(tmp_path, workspace):
    bad = tmp_path / "loop.yaml"
    bad.write_text("seed: 1\nmodel: &m [*m]\n")
    return ["config", "validate", bad], tmp_path, 2, [f"{bad}:2: an alias here refers to a value that contains it"]


def template_case(name: str, body: str, *said: str):
    def case(tmp_path, workspace):
        template = tmp_path / "chat.tmpl"
        template.write_text(body)
        _, config = workspace
        return (["data", "preview", config, f"data.chat_template={template}"], tmp_path, 2,
                [f"data.chat_template ({template})", *said])

    case.__name__ = f"case_template_{name}"
    return case


case_template_that_never_ends = template_case(
    "that_never_ends", "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "did not finish rendering one conversation in 10 s")
case_template_that_raises = template_case("that_raises", "{{ raise_exception('system messages are not supported') }}",
                                          "raised an error: system messages are not supported")
case_template_syntax_error = template_case("syntax_error", "{% for m in messages %}{{ m.content }}", "line 1: not valid Jinja")
case_template_reaching_for_globals = template_case("reaching_for_globals", "{{ cycler.__init__.__globals__ }}", "was stopped by the sandbox")


def case_model_folder_that_is_not_a_model(tmp_path, workspace):
    _, config = workspace
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "notes.txt").write_text("not weights\n")
    return (["data", "preview", config, f"model.name={folder}"], tmp_path, 2,
            [f"model.name: {folder} is a folder without config.json, so not a model (it holds notes.txt)"])


def case_custom_model_code_without_trust(tmp_path, workspace, tiny_model_dir):
    _, config = workspace
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    settings = json.loads((folder / "config.json").read_text())
    settings.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(settings))
    (folder / "configuration_custom.py").write_text("raise SystemExit('this code must not run')\n")
    return (["data", "preview", config, f"model.name={folder}"], tmp_path, 2,
            [f"model.name: {folder} ships its own model code", "model.trust_remote_code: true"])


def case_malformed_hub_id(tmp_path, workspace):
    _, config = workspace
    return (["data", "preview", config, "model.name=my model!"], tmp_path, 2,
            ["model.name: 'my model!' is not a hub id", "smollm2-135m-instruct"])


def case_adapter_missing_its_weights(tmp_path, workspace):
    run = copy_run(workspace, f"noweights-{tmp_path.name}")
    (run / "adapter" / "adapter_model.safetensors").unlink()
    return (["chat", run, "--prompt", "Echo red"], run, 2,
            [f"{run / 'adapter'} lacks adapter_model.safetensors or adapter_model.bin"])


def case_adapter_cut_short(tmp_path, workspace):
    run = copy_run(workspace, f"cut-{tmp_path.name}")
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return (["merge", run], run, 2, [f"{weights} cannot be read", "damaged or cut short"])


def case_finished_run_whose_adapter_config_was_deleted(tmp_path, workspace):
    run = copy_run(workspace, f"noconfig-{tmp_path.name}")
    (run / "adapter" / "adapter_config.json").unlink()
    return (["chat", run, "--prompt", "Echo red"], run, 2,
            [f"{run} finished at step 4, but neither adapter/adapter_config.json nor model/config.json is there",
             "copy the run again (or take the weights checkpoints/checkpoint-4 holds"])


def case_adapter_config_cut_short(tmp_path, workspace):
    run = copy_run(workspace, f"cutconfig-{tmp_path.name}")
    config = run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text()[:100])
    return (["chat", run, "--prompt", "Echo red"], run, 2, [f"{config} cannot be read (", "damaged or cut short"])


def case_adapter_config_emptied(tmp_path, workspace):
    run = copy_run(workspace, f"emptyconfig-{tmp_path.name}")
    (run / "adapter" / "adapter_config.json").write_text("{}\n")
    return (["eval", run], run, 2, [f"{run / 'adapter' / 'adapter_config.json'} cannot be read (it names no peft_type)"])


def case_adapter_config_rank_edited(tmp_path, workspace):
    run = copy_run(workspace, f"rank-{tmp_path.name}")
    config = run / "adapter" / "adapter_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "r": settings["r"] * 2}))
    return (["merge", run], run, 2, [f"{run / 'adapter'} does not fit its base model", "size mismatch for",
                                     "copy the run again"])


def case_tokenizer_file_cut_short(tmp_path, workspace):
    run = copy_run(workspace, f"cuttok-{tmp_path.name}")
    tokenizer = run / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:500])
    return ["eval", run], run, 2, [f"{run / 'tokenizer'} cannot be loaded (", "copy the run again, whole"]


def case_init_from_a_run_whose_weights_are_cut_short(tmp_path, workspace):
    run = copy_run(workspace, f"initcut-{tmp_path.name}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    _, config = workspace
    return (["train", config, f"init_from={run}", f"output_dir={tmp_path / 'next'}"], tmp_path, 2,
            [f"init_from: {run / 'adapter' / 'adapter_model.safetensors'} cannot be read", "damaged or cut short"])


def case_run_without_its_tokenizer(tmp_path, workspace):
    run = copy_run(workspace, f"notok-{tmp_path.name}")
    shutil.rmtree(run / "tokenizer")
    return ["eval", run], run, 2, [f"{run} lacks its tokenizer/ folder"]


def case_chat_answer_of_no_length(tmp_path, workspace):
    run = copy_run(workspace, f"short-{tmp_path.name}")
    return ["chat", run, "--prompt", "hi", "--max-new-tokens", "-5"], run, 2, ["--max-new-tokens: -5: give 1 or more"]


def case_serve_port_out_of_range(tmp_path, workspace):
    run = copy_run(workspace, f"port-{tmp_path.name}")
    return ["serve", run, "--port", "99999"], run, 2, ["--port: 99999: give 1 to 65535"]


def case_merge_out_is_a_file(tmp_path, workspace):
    run = copy_run(workspace, f"outfile-{tmp_path.name}")
    target = tmp_path / "afile"
    target.write_text("mine\n")
    return ["merge", run, "--out", target], tmp_path, 2, [f"--out {target} is a file; give a folder path"]


def case_chat_with_a_run_stopped_midway(tmp_path, workspace):
    run = copy_run(workspace, f"stopped-{tmp_path.name}")
    shutil.rmtree(run / "adapter")  # a run stopped after its checkpoints, before its final weights
    started = json.loads((run / "manifest.json").read_text())  # and before the manifest's end-of-run half
    (run / "manifest.json").write_text(json.dumps({key: started[key] for key in ("cwd", "data_files", "precision")}))
    return (["chat", run, "--prompt", "hi"], run, 2,
            [f"{run} has no finished adapter", f"stopped at or after checkpoint-4: carry it on to its end with "
             f"`loraforge train CONFIG output_dir={run} --resume auto`"])


def claimed_by(tmp_path, workspace, make_claim, finished: bool) -> tuple[Path, Path]:
    """A copy of the finished run (or of it stopped after its last checkpoint) in tmp_path whose claim file
    make_claim replaced."""
    root, _ = workspace
    run = tmp_path / "run"
    shutil.copytree(root / "finished", run)
    if not finished:
        (run / "manifest.json").unlink()
    claim = run / ".loraforge-run"
    claim.unlink()
    make_claim(claim)
    return run, claim


def case_resume_with_its_claim_linked_to_a_file(tmp_path, workspace):
    (tmp_path / "notes.txt").write_text("mine\n")
    run, claim = claimed_by(tmp_path, workspace, lambda claim: claim.symlink_to(tmp_path / "notes.txt"), True)
    return (["train", workspace[1], f"output_dir={run}", "--resume", "auto"], tmp_path, 2,
            [f"{claim} is a link, not the file loraforge writes to claim {run}; move it out of {run} and run again"])


def case_resume_with_its_claim_linked_to_nothing(tmp_path, workspace):
    run, claim = claimed_by(tmp_path, workspace, lambda claim: claim.symlink_to(tmp_path / "elsewhere"), False)
    return (["train", workspace[1], f"output_dir={run}", "train.max_steps=6", "--resume", "auto", "--allow-changes"],
            tmp_path, 2, [f"{claim} is a link, not the file loraforge writes"])


def case_resume_with_its_claim_a_folder(tmp_path, workspace):
    def folder(claim: Path) -> None:
        claim.mkdir()
        (claim / "mine.txt").write_text("mine\n")

    run, claim = claimed_by(tmp_path, workspace, folder, False)
    return (["train", workspace[1], f"output_dir={run}", "train.max_steps=6", "--resume", "auto", "--allow-changes"],
            tmp_path, 2, [f"{claim} is a folder, not the file loraforge writes to claim {run}"])


def case_output_dir_that_cannot_be_made(tmp_path, workspace):
    _, config = workspace
    (tmp_path / "plain-file").write_text("x\n")
    out = tmp_path / "plain-file" / "run"
    return (["train", config, f"output_dir={out}"], tmp_path, 2, [f"output_dir {out} cannot be written"])


def case_validation_source_emptied_by_filtering(tmp_path, workspace):
    _, config = workspace
    long = {"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "ok"}]}
    val = write_jsonl(tmp_path / "val.jsonl", [long] * 3)
    train = write_jsonl(tmp_path / "train.jsonl", ECHO_ROWS)
    sources = f"data.sources=[{{path: {train}}}, {{path: {val}, split: val}}]"
    return (["train", config, f"output_dir={tmp_path / 'run'}", sources, "data.max_length=64"], tmp_path, 2,
            [f"{val} (data.sources[1], split: val): all 3 rows were dropped"])


CASES = [case_duplicate_keys, case_not_utf8, case_config_is_a_directory, case_output_dir_holds_other_files,
         case_output_dir_is_a_file, case_merge_into_a_foreign_folder, case_resume_a_finished_run,
         case_resume_past_max_steps, case_extend_a_finished_run_by_epochs,
         case_unknown_target_module, case_misspelt_builtin_model, case_template_path_naming_no_file,
         case_billion_laughs, case_alias_containing_itself, case_template_that_never_ends, case_template_that_raises,
         case_template_syntax_error, case_template_reaching_for_globals, case_model_folder_that_is_not_a_model,
         case_custom_model_code_without_trust, case_malformed_hub_id, case_adapter_missing_its_weights,
         case_adapter_cut_short, case_finished_run_whose_adapter_config_was_deleted, case_adapter_config_cut_short, case_adapter_config_emptied,
         case_adapter_config_rank_edited, case_tokenizer_file_cut_short, case_init_from_a_run_whose_weights_are_cut_short,
         case_run_without_its_tokenizer, case_chat_answer_of_no_length,
         case_serve_port_out_of_range, case_merge_out_is_a_file, case_chat_with_a_run_stopped_midway, case_output_dir_that_cannot_be_made, case_validation_source_emptied_by_filtering,
         case_resume_with_its_claim_linked_to_a_file, case_resume_with_its_claim_linked_to_nothing,
         case_resume_with_its_claim_a_folder]


def name_of(case) -> str:
    return case.__name__.removeprefix("case_")


@dataclass
class Outcome:
    args: list
    code: int
    messages: list[str]
    returncode: int
    stderr: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, workspace, tiny_model_dir) -> dict[str, Outcome]:
    """Every case's command, each in its own process forked from one that imported the libraries once
    (tests/forked_cli.py), as many at once as there are CPU cores, with its folder hashed before and after."""
    logs = tmp_path_factory.mktemp("hostile-logs")
    prepared, jobs = {}, {}
    for case in CASES:
        tmp_path = tmp_path_factory.mktemp(name_of(case))
        wants_model = "tiny_model_dir" in inspect.signature(case).parameters
        args, watched, code, messages = case(tmp_path, workspace, tiny_model_dir) if wants_model else case(tmp_path, workspace)
        prepared[name_of(case)] = (args, watched, code, messages, digest(watched))
        jobs[name_of(case)] = {"args": list(map(str, args)), "cwd": str(tmp_path),
                               "stdout": str(logs / f"{name_of(case)}.out"), "stderr": str(logs / f"{name_of(case)}.err")}
    (logs / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run([sys.executable, str(Path(__file__).parent / "forked_cli.py"), logs / "jobs.json",
                    logs / "results.json"], check=True, timeout=600)
    results = json.loads((logs / "results.json").read_text())
    return {name: Outcome(args, code, messages, results[name]["code"], Path(jobs[name]["stderr"]).read_text(),
                          results[name]["seconds"], before, digest(watched))
            for name, (args, watched, code, messages, before) in prepared.items()}


@pytest.mark.parametrize("name", [name_of(case) for case in CASES])
def test_refused_with_a_message_and_nothing_written(name, outcomes):
    outcome = outcomes[name]
    stderr = outcome.stderr
    assert outcome.returncode == outcome.code, stderr[-3000:]
    assert "Traceback" not in stderr
    for message in outcome.messages:
        assert message in stderr, stderr[-3000:]
    assert outcome.after == outcome.before, "a refused command changed files"
    assert outcome.seconds < 30 + STARTUP_SECONDS, "answered within 30 s of starting work"


DAMAGES = {
    "optimizer-missing": (lambda checkpoint: (checkpoint / "optimizer.pt").unlink(), "optimizer.pt missing"),
    "corrupt-marker": (lambda checkpoint: (checkpoint / "COMPLETE").write_text("{not json"),
                       "is not the JSON loraforge writes"),
    "optimizer-cut-short": (lambda checkpoint: (checkpoint / "optimizer.pt").write_bytes(
        (checkpoint / "optimizer.pt").read_bytes()[:1000]), "optimizer.pt is 1000 bytes"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_the_newest_usable_checkpoint_passes_over_a_damaged_one_and_says_why(workspace, tmp_path, name, caplog):
    from loraforge.training.checkpoints import latest_complete

    damage, said = DAMAGES[name]
    run = copy_run(workspace, f"damaged-{tmp_path.name}")
    damage(run / "checkpoints" / "checkpoint-4")
    with caplog.at_level("WARNING"):
        assert latest_complete(run / "checkpoints") == run / "checkpoints" / "checkpoint-2"
    assert f"skipping {run / 'checkpoints' / 'checkpoint-4'} for an earlier checkpoint: " in caplog.text
    assert said in caplog.text


# Each damage is told apart above; train --resume auto is run on all three under make test-all.
@pytest.mark.parametrize("damage, said", [
    pytest.param(*DAMAGES["optimizer-missing"], marks=pytest.mark.slow),
    pytest.param(*DAMAGES["corrupt-marker"], marks=pytest.mark.slow),
    DAMAGES["optimizer-cut-short"],
], ids=list(DAMAGES))
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


def test_ctrl_c_while_the_libraries_load_ends_with_one_line(monkeypatch, capsys):
    from loraforge import cli

    def interrupted():
        raise KeyboardInterrupt  # Ctrl-C in the first second, while torch is being imported

    monkeypatch.setattr(cli, "tune_process", interrupted)
    assert cli.main(["train", "any.yaml"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
