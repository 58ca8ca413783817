import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraforge.cli import main
from loraforge.config import RunConfig, config_to_yaml, load_config, write_resolved
from loraforge.data.formats import from_classification
from loraforge.data.sources import read_rows
from loraforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "configs" / "launch"
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if LAUNCH not in p.parents)
LAUNCH_CONFIGS = sorted(LAUNCH.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "data:\n  sources:\n    - {path: d.jsonl}\n"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=[p.name for p in LAUNCH_CONFIGS])
def test_launch_configs_are_valid_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type


def test_accelerate_launch_starts_one_process_on_cpu_however_many_its_config_asks_for(tmp_path):
    """Why configs/launch holds no CPU config, and the README sends CPU users to --nproc: a MULTI_CPU config with
    num_processes 2 starts one plain process (no WORLD_SIZE), which would train alone under a two-process name."""
    config = write(tmp_path / "multi_cpu.yaml", "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
                   "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    script = write(tmp_path / "world.py", "import os\nprint('world size', os.environ.get('WORLD_SIZE', 1))\n")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                           str(config), str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("world size")] == ["world size 1"]


@pytest.mark.parametrize("path", [p for p in LAUNCH_CONFIGS if "deepspeed" in p.name], ids=lambda p: p.name)
def test_deepspeed_launch_configs_build_accelerates_plugin_and_leave_the_batch_to_the_config(path):
    """CUDA-only (deepspeed is not installed here), so the check stops at accelerate's plugin: it must build, and
    every value HF's Trainer checks against the run's settings must be auto, else a differing train.grad_accum
    or max_grad_norm stops the run when it starts."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DeepSpeedPlugin

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == "DEEPSPEED"
    plugin = DeepSpeedPlugin(**config.deepspeed_config)
    assert plugin.zero_stage in (1, 2, 3)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert plugin.deepspeed_config[key] == "auto", key
    assert "CUDA only" in path.read_text()


def test_shipped_configs_exist():
    assert ROOT / "configs" / "default.yaml" in CONFIGS and ROOT / "configs" / "dpo.yaml" in CONFIGS


def test_defaults_are_the_documented_ones(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", MINIMAL))
    assert config.model.name == "smollm2-135m-instruct"
    assert config.seed == 42
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.data.sources[0].format.value == "messages"
    assert config.train.max_steps == 100 and config.train.num_epochs is None


def test_default_yaml_spells_out_the_schema_defaults():
    shipped = load_config(ROOT / "configs" / "default.yaml").model_dump()
    defaults = RunConfig.model_validate({"data": {"sources": [{"path": "data/chatterbot_en.jsonl"}]}}).model_dump()
    assert shipped == defaults


def test_extends_chain_merges_mappings_and_replaces_lists(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "lora:\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, k_proj]\ntrain:\n  batch_size: 2\n")
    write(tmp_path / "sub" / "mid.yaml", "extends: ../base.yaml\nlora:\n  r: 8\n  target_modules: [v_proj]\n")
    child = write(tmp_path / "sub" / "child.yaml", "extends: mid.yaml\ntrain:\n  learning_rate: 0.001\n")
    config = load_config(child)
    assert config.lora.r == 8
    assert config.lora.alpha == 8
    assert config.lora.target_modules == ["v_proj"]
    assert config.train.batch_size == 2
    assert config.train.learning_rate == 0.001


def test_extends_cycle_is_rejected(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + MINIMAL)
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_extends_missing_parent_names_line(tmp_path):
    path = write(tmp_path / "a.yaml", MINIMAL + "extends: nope.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:4" in str(info.value) and "nope.yaml" in str(info.value)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    config = load_config(
        path,
        [
            "lora.target_modules=[q_proj,v_proj]",
            "train.max_steps=5",
            "lora.r=8",
            "train.learning_rate=1e-3",
            "data.system_prompt=Be brief.",
            "data.sources.0.format=alpaca",
            "output_dir=/tmp/run1",
        ],
    )
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.max_steps == 5 and config.lora.r == 8
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.data.system_prompt == "Be brief."
    assert config.data.sources[0].format.value == "alpaca"
    assert config.output_dir == "/tmp/run1"


def test_epochs_alone_train_by_epochs_over_a_file_or_parent_that_gives_steps(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    assert load_config(path).train.max_steps == 100, "neither given: 100 steps"
    config = load_config(path, ["train.num_epochs=2"])
    assert config.train.max_steps is None and config.train.num_epochs == 2
    over_default = load_config(ROOT / "configs" / "default.yaml", ["train.num_epochs=3"])
    assert over_default.train.max_steps is None and over_default.train.num_epochs == 3
    write(tmp_path / "parent.yaml", MINIMAL + "train:\n  max_steps: 40\n  warmup_ratio: 0.1\n")
    child = load_config(write(tmp_path / "child.yaml", "extends: parent.yaml\ntrain:\n  num_epochs: 1\n  warmup_steps: 5\n"))
    assert (child.train.max_steps, child.train.num_epochs) == (None, 1)
    assert (child.train.warmup_ratio, child.train.warmup_steps) == (None, 5)
    back = load_config(tmp_path / "child.yaml", ["train.max_steps=7"])
    assert (back.train.max_steps, back.train.num_epochs) == (7, None), "the override layer wins in turn"


def test_both_of_a_pair_in_one_layer_is_an_error_saying_which_to_drop(tmp_path):
    both = write(tmp_path / "both.yaml", MINIMAL + "train:\n  max_steps: 10\n  num_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"train.max_steps \(10\) and train.num_epochs \(2\) are both set; drop one"):
        load_config(both)
    with pytest.raises(ConfigError, match=r"train.warmup_ratio \(0.1\) and train.warmup_steps \(3\) are both set"):
        load_config(write(tmp_path / "c.yaml", MINIMAL), ["train.warmup_ratio=0.1", "train.warmup_steps=3"])


def test_output_dir_placeholders_are_checked(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    assert load_config(path).output_dir == "runs/{model}-{data}-{time}", "runs never collide by default"
    with pytest.raises(ConfigError, match=r"output_dir: unknown \{date\}; output_dir can use \{model\}"):
        load_config(path, ["output_dir=runs/{date}"])
    assert load_config(path, ["output_dir=runs/{{x}}"]).output_dir == "runs/{{x}}"


def test_both_warmup_keys_null_and_formatted_output_dir_fields_are_refused(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(ConfigError, match=r"set train.warmup_ratio or train.warmup_steps \(0 for no warmup\)"):
        load_config(path, ["train.warmup_ratio=null", "train.warmup_steps=null"])
    with pytest.raises(ConfigError, match=r"write the fields plain \(\{time\}, not \{time:...\}\)"):
        load_config(path, ["output_dir=runs/{time:%Y}"])


def test_depth_reached_through_reused_aliases_is_bounded(tmp_path):
    lines = ["a0: &a0 1"] + [f"a{i}: &a{i} " + "[" * 30 + f"*a{i - 1}" + "]" * 30 for i in range(1, 6)]
    deep = write(tmp_path / "deep.yaml", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="nested more than 64 levels deep"):
        load_config(deep)
    plain = write(tmp_path / "plain.yaml", "a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply to read"):
        load_config(plain)


def test_epoch_evaluation_and_saving_are_accepted_and_typos_are_not(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    config = load_config(path, ["train.eval_every=epoch", "train.save_every=epoch", "train.eval_batch_size=16"])
    assert (config.train.eval_every, config.train.save_every, config.train.eval_batch_size) == ("epoch", "epoch", 16)
    with pytest.raises(ConfigError, match="train.eval_every"):
        load_config(path, ["train.eval_every=epochs"])


def test_all_problems_reported_at_once_with_line_and_suggestion(tmp_path):
    path = write(
        tmp_path / "bad.yaml",
        "lora:\n  rank: 8\ntrain:\n  lerning_rate: 0.1\n  batch_size: 0\n"
        "data:\n  sources:\n    - {path: d.jsonl, format: chatml}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["trian.max_steps=3", "not-an-override"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert f"{path}:2: lora.rank: unknown key" in text
    assert f"{path}:4: train.lerning_rate: unknown key; did you mean 'train.learning_rate'?" in text
    assert f"{path}:5: train.batch_size" in text and "(got 0)" in text
    assert f"{path}:8: data.sources[0].format" in text and "'chatml'" in text
    assert "command line 'trian.max_steps=3': trian: unknown key; did you mean 'train'?" in text
    assert "'not-an-override' is not KEY=VALUE" in text


def test_script_setting_names_get_the_loraforge_key_they_mean(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "num_train_epochs: 3\nlora_alpha: 16\n"
                 "train:\n  save_steps: 10\n  eval_steps: 5\n  gradient_accumulation_steps: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    for line, key, meant in [(7, "train.save_steps", "train.save_every"), (8, "train.eval_steps", "train.eval_every"),
                             (9, "train.gradient_accumulation_steps", "train.grad_accum"),
                             (4, "num_train_epochs", "train.num_epochs"), (5, "lora_alpha", "lora.alpha")]:
        assert f"{path}:{line}: {key}: unknown key; did you mean {meant!r}?" in text, text


def test_underscore_extends_is_extends(tmp_path):
    write(tmp_path / "base.yaml", MINIMAL + "lora:\n  r: 4\n")
    config = load_config(write(tmp_path / "child.yaml", "_extends: base.yaml\nseed: 7\n"))
    assert config.lora.r == 4 and config.seed == 7
    both = write(tmp_path / "both.yaml", "_extends: base.yaml\nextends: base.yaml\n")
    with pytest.raises(ConfigError, match=rf"{both}:1: _extends and extends \(at {both}:2\) are the same key"):
        load_config(both)


def test_missing_required_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data: required key is missing \(Training data.\)"):
        load_config(write(tmp_path / "c.yaml", "seed: 1\n"))


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "train:\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:" in str(info.value) and "not valid YAML" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", MINIMAL), ["lora.r=4"])
    written = write_resolved(config, tmp_path)
    assert load_config(written) == config
    assert yaml.safe_load(written.read_text())["lora"]["r"] == 4


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", MINIMAL))
    with pytest.raises(Exception):
        config.seed = 3


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            inner = getattr(field.annotation, "model_fields", None)
            if inner is not None:
                walk(field.annotation, f"{prefix}{name}.")

    walk(RunConfig)


def test_cli_show_prints_resolved_yaml(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", MINIMAL)
    assert main(["config", "show", str(path), "lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["lora"]["r"] == 4
    assert shown == yaml.safe_load(config_to_yaml(load_config(path, ["lora.r=4"])))


def test_cli_validate_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = write(tmp_path / "good.yaml", MINIMAL)
    bad = write(tmp_path / "bad.yaml", MINIMAL + "seeed: 1\n")
    assert main(["config", "validate", str(good)]) == 2, "d.jsonl is not there yet"
    assert f"data.sources[0].path: d.jsonl: data file not found (cwd is {tmp_path})" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                      '"content": "b"}]}\n')
    assert main(["config", "validate", str(good), "data.sources=[{path: d.jsonl}, {path: owner/hub-set}]"]) == 0
    assert main(["config", "validate", str(good), "model.name=./no-model", f"init_from={tmp_path / 'no-run'}"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and f"model.name: folder ./no-model not found (cwd is {tmp_path})" in err
    assert f"init_from: {tmp_path / 'no-run'} is not a run directory" in err
    (tmp_path / "notes.txt").write_text("a\n")
    assert main(["config", "validate", str(good), "data.sources=[{path: notes.txt, format: text}]",
                 "data.chat_template=nofile.jinja"]) == 2
    err = capsys.readouterr().err
    assert "data.sources[0].path: notes.txt: not a .jsonl, .json, .csv or .parquet file" in err
    assert "data.chat_template: 'nofile.jinja' is neither a Jinja template" in err
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: seeed: unknown key; did you mean 'seed'?" in err


def test_validate_reads_the_rows_train_would_refuse(tmp_path, capsys, monkeypatch):
    """`config validate` said valid for a .json file holding one object and for a file with a row cut short, both of
    which train refuses once it reads the rows."""
    monkeypatch.chdir(tmp_path)
    good = write(tmp_path / "good.yaml", MINIMAL)
    row = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    (tmp_path / "wrapped.json").write_text(json.dumps({"train": [json.loads(row)] * 3}))
    (tmp_path / "cut.jsonl").write_text(f"{row}\n{row[:30]}\n{row}\n")
    assert main(["config", "validate", str(good), "data.sources=[{path: wrapped.json, format: messages}]"]) == 2
    assert "wrapped.json: one JSON object (keys: train), not rows" in capsys.readouterr().err
    assert main(["config", "validate", str(good), "data.sources=[{path: cut.jsonl, format: messages}]"]) == 2
    err = capsys.readouterr().err
    assert "cut.jsonl:2: not valid JSON" in err and "set data.on_bad_row=skip to drop such rows" in err
    assert main(["config", "validate", str(good), "data.sources=[{path: cut.jsonl, format: messages}]",
                 "data.on_bad_row=skip"]) == 0
    assert capsys.readouterr().out == f"{good}: valid\n"


RUN_COMMANDS = [["chat", "{run}"], ["eval", "{run}"], ["merge", "{run}"], ["export", "gguf", "{run}"],
                ["export", "ollama", "{run}"], ["predict", "{run}", "--text", "hi"], ["serve", "{run}"]]


def test_a_run_command_on_a_folder_that_is_no_run_is_refused_before_the_libraries_load(tmp_path):
    """Each command that reads a run directory says what is wrong with it without first importing transformers,
    peft and the rest (seconds): a path that does not exist (a typo), a file, a folder that holds no run."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file.jsonl").write_text("{}\n")
    paths = {"no-run": "it does not exist", "a-file.jsonl": "it is a file", "a-folder": "resolved.yaml is missing"}
    script = f"""
import sys
from loraforge.cli import main
for run in {[str(tmp_path / name) for name in paths]!r}:
    for command in {RUN_COMMANDS!r}:
        assert main([part.format(run=run) for part in command]) == 2, command
print("LOADED", [m for m in ("transformers", "peft", "trl", "datasets") if m in sys.modules])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert said == [f"error: {tmp_path / name} is not a run directory: {why}; pass the output_dir of a training run"
                    for name, why in paths.items() for _ in RUN_COMMANDS], done.stderr[-3000:]


def test_cli_schema_lists_descriptions(capsys):
    import json

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "LoRA rank." in json.dumps(schema)


@pytest.mark.parametrize("command", [["train"], ["estimate"], ["config", "validate"], ["config", "show"]])
def test_a_command_without_its_config_asks_for_the_config_alone(command, capsys):
    """The overrides are optional (CONFIG [KEY=VALUE ...]); argparse used to name them as required too."""
    with pytest.raises(SystemExit) as exited:
        main(command)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: the following arguments are required: config")


def test_help_does_not_import_the_heavy_stack():
    code = "import sys; from loraforge.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("override, key", [
    ("train.micro_batch_tokens=0", "train.micro_batch_tokens"),
    ("train.micro_batch_tokens=-256", "train.micro_batch_tokens"),
    ("seed=-1", "seed"),
    ("model.variant=drop_layers", "model.drop_layers"),
    ("classification.class_weights={a: 0}", "classification.class_weights"),
])
def test_numeric_keys_are_bounded(tmp_path, override, key):
    config = write(tmp_path / "c.yaml", MINIMAL)
    extra = ["model.drop_layers=[-1]"] if key == "model.drop_layers" else []
    with pytest.raises(ConfigError) as error:
        load_config(config, [override, *extra])
    assert key in str(error.value)


@pytest.mark.parametrize("override, said", [
    ("train.learning_rate=.inf", "train.learning_rate: Input should be a finite number (got inf)"),
    ("train.learning_rate=.nan", "train.learning_rate: Input should be a finite number (got nan)"),
    ("data.sources[0].weight=.inf", "data.sources[0].weight: Input should be a finite number (got inf)"),
    ("data.sources[0].weight=1000000000", "data.sources[0].weight: Input should be less than or equal to 1000"),
    ("train.max_steps=99999999999999999999999", "train.max_steps: past the largest whole number a run can use "
                                                "(9223372036854775807) (got 99999999999999999999999)"),
    ("classification.class_weights={a: .inf}", "classification.class_weights: give none or auto or a mapping"),
])
def test_a_number_no_run_can_use_is_refused_before_anything_loads(tmp_path, override, said):
    """An infinite learning rate used to load the model and stop at step 2 with a NaN loss; an infinite weight raised
    OverflowError in the data build, a weight of 1e9 MemoryError, and a max_steps past 64 bits trained with a
    learning rate of 1e-23 and an ETA of 10^20 minutes."""
    config = write(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(ConfigError) as error:
        load_config(config, [override])
    assert said in str(error.value)


def test_a_list_position_override_changes_that_position_of_the_default_list(tmp_path):
    """The file leaves lora.target_modules at its default [q_proj, k_proj, v_proj, o_proj]: [0] replaced the whole
    list with one module, and [1] was past the end of a list of 0."""
    config = write(tmp_path / "c.yaml", MINIMAL)
    assert load_config(config, ["lora.target_modules[0]=up_proj"]).lora.target_modules == [
        "up_proj", "k_proj", "v_proj", "o_proj"]
    assert load_config(config, ["lora.target_modules[4]=gate_proj"]).lora.target_modules == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules\[5\] is past the end of a list of 4"):
        load_config(config, ["lora.target_modules[5]=x"])


def test_a_bad_value_of_a_key_that_takes_several_types_is_one_error_saying_what_it_takes(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "train:\n  eval_every: 0\n  save_every: soon\n  micro_batch_tokens: -3\n"
                 "lora:\n  target_modules: [q_proj, 5]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert sorted(error.value.problems) == [
        f"{path}:5: train.eval_every: give a whole number (1 or more) or epoch (got 0)",
        f"{path}:6: train.save_every: give a whole number (1 or more), epoch or null (got 'soon')",
        f"{path}:7: train.micro_batch_tokens: give a whole number (1 or more), auto or null (got -3)",
        f"{path}:9: lora.target_modules: give a list of text or all-linear (got ['q_proj', 5])"]


def test_a_best_metric_the_task_does_not_report_is_refused_before_any_work(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", MINIMAL + "train: {best_metric: eval_acuracy}\n")
    assert main(["train", str(config), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "train.best_metric: 'eval_acuracy' is not a metric a causal_lm run reports; use one of eval_loss" in err
    assert not (tmp_path / "run").exists()
    assert load_config(config, ["train.best_metric=loss"]).train.best_metric == "loss"


def test_true_false_is_no_number_and_quoted_text_is_text(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "train:\n  max_steps: 3\n  eval_every: yes\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["lora.r=true", "lora.dropout=on", "data.system_prompt=Yes"])
    text = "\n".join(error.value.problems)
    assert len(error.value.problems) == 4, text
    for where in (f"{path}:6: train.eval_every", "'lora.r=true': lora.r", "'lora.dropout=on': lora.dropout",
                  "'data.system_prompt=Yes': data.system_prompt"):
        assert f"{where}: this key takes no true/false" in text, where
    config = load_config(path, ["train.eval_every=5", "data.system_prompt='Yes'", "data.dedupe=yes"])
    assert (config.data.system_prompt, config.data.dedupe) == ("Yes", True)


def test_a_mapping_override_merges_and_problems_it_makes_name_the_command_line(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "train:\n  batch_size: 2\n  warmup_ratio: 0.1\n  max_steps: 6\n")
    config = load_config(path, ["train={num_epochs: 2}"])
    assert (config.train.num_epochs, config.train.max_steps) == (2, None), "num_epochs replaces max_steps, as in a layer"
    assert (config.train.batch_size, config.train.warmup_ratio) == (2, 0.1), "the file's other train keys stay"
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.max_steps="])
    assert error.value.problems == [f"command line 'train.max_steps=' (over {path}:4): train: set train.max_steps or "
                                    "train.num_epochs"]
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.num_epochs=2", "train.max_steps=4"])
    assert error.value.problems[0].startswith("command line 'train.max_steps=4', command line 'train.num_epochs=2' "
                                              f"(over {path}:4): train: train.max_steps (4) and train.num_epochs (2)")


def test_four_bit_settings_with_eight_bit_loading_are_refused_by_name(tmp_path):
    """bitsandbytes' 8-bit loading has no quant type, double quantization or compute dtype: such a value would do
    nothing. The defaults pass, as resolved.yaml of an 8-bit run lists them."""
    path = write(tmp_path / "c.yaml", MINIMAL + "quantization: {mode: 8bit, compute_dtype: bf16, double_quant: false}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.problems == [
        f"{path}:4: quantization: double_quant false and compute_dtype \"bf16\": 4-bit settings, which bitsandbytes' "
        "8-bit loading does not have (they would do nothing with mode 8bit); remove them, or use mode 4bit"]
    eight = load_config(path, ["quantization=8bit"])
    written = write_resolved(eight, tmp_path)
    assert load_config(written) == eight and yaml.safe_load(written.read_text())["quantization"]["mode"] == "8bit"
    assert load_config(path, ["quantization.mode=4bit"]).quantization.compute_dtype == "bf16"


def test_an_override_takes_a_key_as_loraforges_messages_print_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "c.yaml", MINIMAL)
    assert main(["config", "validate", str(path)]) == 2
    printed = re.search(r"(\S+): d.jsonl: data file not found", capsys.readouterr().err)[1]
    assert printed == "data.sources[0].path"
    write(tmp_path / "other.jsonl", '{"instruction": "Say hi", "output": "hi"}\n')
    assert main(["config", "validate", str(path), f"{printed}=other.jsonl", "data.sources[0].format=alpaca"]) == 0
    config = load_config(path, ["data.sources[0].format=alpaca", "data.sources.0.fields={output: answer}",
                                "data.sources[1]={path: more.jsonl}"])
    assert [(s.path, s.format.value, s.fields) for s in config.data.sources] == [
        ("d.jsonl", "alpaca", {"output": "answer"}), ("more.jsonl", "messages", {})]
    with pytest.raises(ConfigError) as error:
        load_config(path, ["data.sources[2].path=x", "lora[0]=x", "data[sources].path=x"])
    assert error.value.problems == [
        "override 'data.sources[2].path=x': data.sources[2] is past the end of a list of 1",
        "override 'data[sources].path=x': 'data[sources].path' is not a key; write KEY=VALUE with a dotted key such as "
        "lora.r=8, and [i] for a list position: data.sources[0].path=x",
        "command line 'lora[0]=x': lora: Input should be a valid dictionary or instance of LoraConfig (got ['x'])"]


def test_class_weights_for_a_label_written_as_a_number_and_as_text_are_an_error_and_a_layer_replaces_the_other(tmp_path):
    parent = write(tmp_path / "c.yaml", MINIMAL + "classification:\n  class_weights: {1: 2.0, 0: 1.0}\n")
    both = "classification.class_weights={1: 2.0, '1': 3.0}"
    with pytest.raises(ConfigError) as error:
        load_config(parent, [both])
    assert error.value.problems == [f"command line {both!r}: classification.class_weights: 1 and '1' are one label, "
                                    "'1' (a whole number is read as its text, as in the data); keep one of them"]
    child = write(tmp_path / "child.yaml", "extends: c.yaml\nclassification:\n  class_weights: {'1': 3.0}\n")
    assert load_config(child).classification.class_weights == {"0": 1.0, "1": 3.0}
    replaced = load_config(parent, ["classification.class_weights={'1': 5.0}"]).classification.class_weights
    assert replaced == {"0": 1.0, "1": 5.0}


def test_a_position_after_a_dot_starts_a_list_the_file_does_not_have_and_a_key_of_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    config = load_config(path, ["eval.sample_prompts.0=hi", "lora.target_modules.0=gate_proj",
                                "classification.class_weights.1=3.0"])
    assert config.eval.sample_prompts == ["hi"]
    assert config.lora.target_modules == ["gate_proj", "k_proj", "v_proj", "o_proj"], "a position of the default list"
    assert config.classification.class_weights == {"1": 3.0}
    bare = write(tmp_path / "bare.yaml", "model: {name: m}\n")
    assert [s.path for s in load_config(bare, ["data.sources.0={path: d.jsonl}"]).data.sources] == ["d.jsonl"]
    for override in ("eval.sample_prompts.²=hi", "data.sources.².path=x"):
        with pytest.raises(ConfigError):
            load_config(path, [override])


@pytest.mark.parametrize("key, text", [("data.system_prompt", "Be #1 helper"), ("output_dir", "runs/exp #2"),
                                       ("data.system_prompt", "Answer: briefly")])
def test_an_override_value_yaml_would_cut_or_read_as_a_mapping_is_refused_with_the_quoted_form(tmp_path, key, text):
    path = write(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(ConfigError) as error:
        load_config(path, [f"{key}={text}"])
    [problem] = error.value.problems
    assert problem.startswith((f"override '{key}={text}': YAML reads '#", f"command line '{key}={text}': {key}: text is "
                               "wanted, and YAML read a mapping")) and "quote the value" in problem, problem
    # The printed fix, as a shell passes it; text YAML reads as a mapping is quoted the same way.
    [quoted] = shlex.split(problem.split("quote the value: ")[1]) if "#" in text else [f"{key}={json.dumps(text)}"]
    config = load_config(path, [quoted, "lora.r=8", "train.num_epochs=0.5", "data.dedupe=true",
                                "lora.target_modules=[q_proj, v_proj]", "train={batch_size: 2}"])
    assert (config.output_dir if key == "output_dir" else config.data.system_prompt) == text
    assert (config.lora.r, config.train.num_epochs, config.data.dedupe, config.lora.target_modules,
            config.train.batch_size) == (8, 0.5, True, ["q_proj", "v_proj"], 2)


def test_whole_number_labels_are_their_text_in_the_config_as_in_the_data(tmp_path):
    rows = write(tmp_path / "rows.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    section = f"task: classification\ndata:\n  sources: [{{path: {rows}, format: classification, labels: [0, 1]}}]\n"
    path = write(tmp_path / "c.yaml", section + "classification:\n  labels: [0, 1]\n  class_weights: {0: 1.0, 1: 3.0}\n")
    config = load_config(path)
    assert config.classification.labels == ["0", "1"] and config.classification.class_weights == {"0": 1.0, "1": 3.0}
    source = config.data.sources[0]
    read = [from_classification(row, where, source).label for where, row in read_rows(str(rows))]
    assert read == ["1", "0"] and set(read) == set(config.classification.class_weights), "the data's labels are these"
    bare = write(tmp_path / "bare.yaml", section)
    weights = ["classification.class_weights.1=3.0", "classification.class_weights.0=1"]
    assert load_config(bare, weights).classification.class_weights == {"1": 3.0, "0": 1.0}
    assert load_config(path, ["classification.class_weights.1=5"]).classification.class_weights == {"0": 1.0, "1": 5}
    with pytest.raises(ConfigError) as error:
        load_config(bare, ["classification.class_weights={0: -1, 1: 2}", "classification.labels=[0, 1.5]"])
    assert error.value.problems == [
        "command line 'classification.labels=[0, 1.5]': classification.labels[1]: Input should be a valid string (got 1.5)",
        "command line 'classification.class_weights={0: -1, 1: 2}': classification.class_weights: a weight is a number "
        "above 0, got {'0': -1}"]


def test_key_yaml_reads_as_no_name_is_refused_at_its_line(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL + "2: 3\ntrain:\n  1.5: 4\nyes: 1\n2020-01-01: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    problems = [problem.split("; known keys")[0] for problem in error.value.problems]
    assert sorted(problems) == sorted([
        f"{path}:4: 2 is not a key here: YAML reads it as a number, and keys are names",
        f"{path}:6: train: 1.5 is not a key here: YAML reads it as a number, and keys are names",
        f"{path}:7: true is not a key here: YAML reads it as true/false, and keys are names",
        f"{path}:8: 2020-01-01 is not a key here: YAML reads it as a date, and keys are names",
    ])
    top = next(problem for problem in error.value.problems if problem.startswith(f"{path}:4:"))
    assert top.endswith("; known keys here: " + ", ".join(RunConfig.model_fields))


def test_override_of_a_whole_list_is_blamed_on_the_command_line(tmp_path):
    path = write(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(ConfigError) as error:
        load_config(path, ["data.sources=[/path]"])
    assert error.value.problems == ["command line 'data.sources=[/path]': data.sources[0]: Input should be a valid "
                                    "dictionary or instance of DataSource (got '/path')"]


@pytest.mark.parametrize("make, words", [
    (lambda path: path.mkdir(), "a directory"),
    (lambda path: os.mkfifo(path), "a named pipe"),
])
def test_extends_of_what_is_no_file_says_what_it_is(tmp_path, make, words):
    make(tmp_path / "parent")
    path = write(tmp_path / "c.yaml", MINIMAL + "extends: parent\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.problems == [f"{path}:4: extends: 'parent' is {words} ({tmp_path / 'parent'}); name the YAML "
                                    "file to extend"]


def test_config_that_is_a_pipe_or_device_is_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path, words in ((tmp_path / "pipe", "a named pipe"), (Path("/dev/null"), "a character device")):
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert error.value.problems == [f"config {path} is {words}, not a file; pass a YAML file"]


def test_validate_refuses_what_train_refuses_against_the_model_and_this_machine(tmp_path, capsys, monkeypatch,
                                                                               tiny_model_dir):
    """It said valid for LoRA modules the model does not have, a global batch one process cannot make, fp16 without
    a GPU and a wandb with no key; train refused each after tokenizing and loading the model. Each is named where
    its key is set."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                                      '"content": "b"}]}\n')
    path = write(tmp_path / "c.yaml", f"model: {{name: {tiny_model_dir}}}\n" + MINIMAL +
                 "lora:\n  modules_to_save: [lm_heads]\ntrain:\n  batch_size: 2\n")
    assert main(["config", "validate", str(path), "lora.modules_to_save=[lm_head]"]) == 0
    capsys.readouterr()
    wanted = ["lora.target_modules=[q_proj, qq_proj]", "lora.modules_to_save=[lm_heads]", "train.global_batch=15",
              "precision=fp16"] + (["report_to=[wandb]"] if importlib.util.find_spec("wandb") else [])
    assert main(["config", "validate", str(path), wanted[0], *wanted[2:]]) == 2
    problems = [line.removeprefix("  - ") for line in capsys.readouterr().err.splitlines()[1:]]
    linear = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    expected = [
        f"command line 'lora.target_modules=[q_proj, qq_proj]': lora.target_modules: ['qq_proj'] are not modules of "
        f"this model; its linear layers are {linear} (or use all-linear)",
        f"{path}:6: lora.modules_to_save: ['lm_heads'] are not modules of this model; give names of its modules "
        "(lm_head, embed_tokens; score for classification)",
        "command line 'train.global_batch=15': train.global_batch: 15 is not a multiple of train.batch_size 2 x 1 "
        "process(es) = 2; change one of them",
    ]
    if not torch.cuda.is_available():
        expected.append("command line 'precision=fp16': precision: fp16 on a CPU runs through a very slow fallback; use "
                        "fp32 or bf16 (or auto)")
    if "report_to=[wandb]" in wanted:
        expected.append("command line 'report_to=[wandb]': report_to: wandb cannot log in (no API key); set "
                        "WANDB_API_KEY (in the environment or a .env file beside the config) or run `wandb login`; "
                        "WANDB_MODE=offline logs to local files instead; or leave wandb out of report_to")
    assert problems == expected
