"""An unquantized run's process never imports bitsandbytes; a quantized one, or one that might load a quantized
checkpoint, keeps it. The mark is process-wide, so the import itself is checked in a fresh process."""

import json
import shutil
import subprocess
import sys
import textwrap

from loraforge.training.bitsandbytes_import import NAME, leave_out_bitsandbytes, needs_bitsandbytes


def test_an_unquantized_run_on_a_local_model_leaves_it_out(make_config):
    config, _ = make_config("plain")
    modules = {}
    assert not needs_bitsandbytes(config)
    assert leave_out_bitsandbytes(config, modules=modules) and modules == {NAME: None}


def test_the_builtin_model_needs_none(make_config):
    config, _ = make_config("builtin", "model.name=smollm2-135m-instruct")
    assert not needs_bitsandbytes(config)


def test_quantizing_or_a_bitsandbytes_optimizer_keeps_it(make_config):
    for overrides in (["quantization=4bit"], ["quantization.mode=8bit"], ["train.optimizer=paged_adamw_8bit"]):
        config, _ = make_config("kept", *overrides)
        modules = {}
        assert needs_bitsandbytes(config), overrides
        assert not leave_out_bitsandbytes(config, modules=modules) and modules == {}, overrides


def test_a_checkpoint_saved_quantized_keeps_it(make_config, tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "saved-4bit")
    settings = json.loads((folder / "config.json").read_text())
    settings["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(settings))
    config, _ = make_config("prequantized", f"model.name={folder}")
    assert needs_bitsandbytes(config)


def test_a_hub_model_not_in_the_cache_keeps_it(make_config, no_hub):
    config, _ = make_config("hub", "model.name=someone/not-cached-anywhere")
    assert needs_bitsandbytes(config)


def test_a_cached_hub_model_is_judged_by_its_cached_config(make_config, tiny_model_dir, no_hub):
    settings = json.loads((tiny_model_dir / "config.json").read_text())
    repo = no_hub / "models--someone--cached-model"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(settings))
    config, _ = make_config("hub-cached", "model.name=someone/cached-model")
    assert not needs_bitsandbytes(config)
    settings["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(settings))
    assert needs_bitsandbytes(config)


def test_already_imported_it_is_left_alone(make_config):
    config, _ = make_config("imported")
    modules = {NAME: sys.modules[NAME]}
    assert not leave_out_bitsandbytes(config, modules=modules) and modules[NAME] is sys.modules[NAME]


def test_a_process_that_left_it_out_builds_its_lora_model_without_it(make_config):
    _, path = make_config("fresh")
    script = textwrap.dedent(f"""
        import sys
        from loraforge.config import load_config
        from loraforge.training.bitsandbytes_import import leave_out_bitsandbytes
        config = load_config({str(path)!r}, [])
        assert leave_out_bitsandbytes(config)
        from peft.import_utils import is_bnb_available
        from transformers.utils import is_bitsandbytes_available
        from loraforge.model.adapters import apply_lora
        from loraforge.model.load import load_for_run
        model = apply_lora(load_for_run(config, config.model.name), r=4, alpha=8, dropout=0.0,
                           target_modules="all-linear", bias="none")
        print(sys.modules.get("bitsandbytes"), is_bnb_available(), is_bitsandbytes_available(),
              model.get_nb_trainable_parameters()[0] > 0)
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["None", "False", "False", "True"]


def test_several_runs_leave_it_out_only_where_none_needs_it(make_config):
    plain, _ = make_config("plain")
    quantized, _ = make_config("quantized", "quantization=4bit")
    modules = {}
    assert not leave_out_bitsandbytes(plain, quantized, modules=modules) and modules == {}
    assert leave_out_bitsandbytes(plain, plain, modules=modules) and modules == {NAME: None}


def test_chatting_with_an_unquantized_run_never_imports_it(make_config):
    """`loraforge chat` in a fresh process, with Python's import-time table (-X importtime) on stderr: an import
    refused is a line of its own, without the package's modules under it."""
    from loraforge.training.run import run_training

    config, _ = make_config("chatted", "train.max_steps=2", "data.val_fraction=0", "train.save_every=null")
    run_training(config)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "loraforge", "chat", config.output_dir,
                           "--prompt", "Echo red", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "loraforge.chat" in imported and "peft" in imported
    assert not [name for name in imported if name.startswith("bitsandbytes.")]


def test_a_finished_run_is_judged_by_the_model_folder_where_it_trained(make_config, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    """A run on models/tiny, trained in project/ on a checkpoint saved quantized, used from another folder that
    holds an unquantized models/tiny of its own: the run's own folder decides (chat and serve load that one), where
    the current folder's decided and left bitsandbytes out of a process that then loaded a 4-bit model."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    quantized = shutil.copytree(tiny_model_dir, project / "models" / "tiny")
    shutil.copytree(tiny_model_dir, elsewhere / "models" / "tiny")
    settings = json.loads((quantized / "config.json").read_text())
    settings["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(settings))
    config, _ = make_config("relative", "model.name=models/tiny")
    monkeypatch.chdir(elsewhere)
    assert not needs_bitsandbytes(config), "from here, models/tiny is the unquantized one"
    assert needs_bitsandbytes(config, str(project))
    modules = {}
    assert not leave_out_bitsandbytes(config, modules=modules, trained_in=(str(project),)) and modules == {}


def test_the_run_commands_pass_the_folder_each_run_trained_in(train_tiny, monkeypatch):
    import os

    from loraforge import cli

    config, _ = train_tiny("train.max_steps=1")
    asked = []
    monkeypatch.setattr(cli, "leave_out_bitsandbytes", lambda *configs, **kwargs: asked.append((configs, kwargs)))
    cli._runs_first(config.output_dir, config.output_dir)
    ((configs, kwargs),) = asked
    assert [c.model.name for c in configs] == [config.model.name] * 2
    assert kwargs == {"trained_in": (os.getcwd(), os.getcwd())}
