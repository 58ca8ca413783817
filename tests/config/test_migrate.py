"""`loraforge config migrate` on the configs users bring from fine-tuning scripts (tests/fixtures/seed-configs,
copied from the project's shared seed configs) and on an unseen one: every source key is carried or listed,
the result validates, and it trains."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from loraforge.cli import main
from loraforge.config import load_config
from loraforge.config.migrate import leaves, migrate, read_script_config, write_migrated
from loraforge.data.sources import first_row
from loraforge.errors import ConfigError
from tests.conftest import ROOT, save_tiny_llama, write_jsonl

SEEDS = ROOT / "tests" / "fixtures" / "seed-configs"
SEED_FILES = sorted(SEEDS.glob("*.y*ml"))


def every_key_is_listed(source: Path, migration) -> None:
    listed = {s for s, _ in migration.rows}
    keys = {".".join(key) for key, _ in leaves(read_script_config(source))}
    assert keys <= listed, f"dropped silently: {sorted(keys - listed)}"


@pytest.mark.parametrize("source", SEED_FILES, ids=[p.name for p in SEED_FILES])
def test_every_seed_config_migrates_with_every_key_listed_and_validates(source, tmp_path):
    migration, text = write_migrated(source, tmp_path / "migrated.yaml", first_row)
    every_key_is_listed(source, migration)
    config = load_config(tmp_path / "migrated.yaml")
    assert config.model.name == "smollm2-135m-instruct"
    assert yaml.safe_load(text) == migration.config


def test_seed_values_are_converted_as_the_scripts_read_them():
    assert SEED_FILES, f"the seed configs are at {SEEDS}"
    by_name = {p.name: migrate(p, first_row).config for p in SEED_FILES}
    first = by_name["000-config.yml"]
    assert first["precision"] == "fp32" and first["logging"]["level"] == "INFO"
    assert first["train"]["num_epochs"] == 3 and first["train"]["warmup_steps"] == 100
    assert first["data"]["sources"] == [{"path": "data/train.jsonl", "format": "text"}], "from text_column"
    assert by_name["002-config.yaml"]["train"]["learning_rate"] == pytest.approx(2e-4), "'2e-4' is a string to YAML 1.1"
    dropped, pruned = by_name["001-dropped_lora.yaml"], by_name["001-pruned.yaml"]
    assert dropped["model"]["drop_layers"] == [16] and dropped["adapter"] == "lora"
    assert dropped["data"]["packing"] is True and dropped["train"]["eval_every"] == 50, "inherited through _extends"
    assert pruned["model"]["variant"] == "keep_layers" and pruned["model"]["keep_layers"] == 24
    assert pruned["adapter"] == "full"
    assert by_name["001-base.yaml"]["tracking"] == {"wandb": {"project": "my-finetune"}}


def test_an_unseen_json_config_with_other_names_and_unknown_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths are read from where training runs, as loraforge reads them
    write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}] * 4)
    write_jsonl(tmp_path / "dev.jsonl", [{"instruction": "Say yo", "input": "", "output": "yo"}] * 2)
    source = tmp_path / "args.json"
    source.write_text(json.dumps({
        "model_name_or_path": "smollm2-135m-instruct", "train_file": "rows.jsonl", "validation_file": "dev.jsonl",
        "per_device_train_batch_size": 8, "num_train_epochs": "2", "bf16": True, "lora_r": "4", "lora_alpha": 8,
        "evaluation_strategy": "epoch", "save_strategy": "no", "metric_for_best_model": "loss",
        "deepspeed": "ds.json", "my_custom_flag": 1, "torch_compile": False,
    }))
    migration = migrate(source, first_row)
    every_key_is_listed(source, migration)
    rows = dict(migration.rows)
    for unknown in ("deepspeed", "my_custom_flag", "torch_compile"):
        assert rows[unknown].startswith("not carried: unknown to loraforge")
    config = migration.config
    assert config["data"]["sources"] == [{"path": "rows.jsonl", "format": "alpaca"},
                                         {"path": "dev.jsonl", "format": "alpaca", "split": "val"}]
    assert any("first row of" in note and "alpaca" in note for note in migration.notes), "the inference is said"
    assert config["train"] == {"batch_size": 8, "num_epochs": 2, "eval_every": "epoch", "save_every": None,
                               "best_metric": "eval_loss"}
    assert config["precision"] == "bf16" and config["lora"] == {"r": 4, "alpha": 8}


@pytest.mark.parametrize("flat, expected", [
    ({"adapter": "full", "precision": "bf16", "num_epochs": 2, "system_prompt": "Be brief", "max_prompt_length": 64},
     {"adapter": "full", "precision": "bf16", "train": {"num_epochs": 2},
      "data": {"system_prompt": "Be brief", "max_prompt_length": 64}}),
    ({"quantization": "8bit"}, {"quantization": "8bit"}),
    ({"adapter": "qlora"}, {"adapter": "lora", "quantization": "4bit"}),
    ({"load_in_4bit": True}, {"quantization": "4bit"}),
    ({"load_in_8bit": True, "load_in_4bit": False}, {"quantization": "8bit"}),
    ({"bnb_4bit_compute_dtype": "torch.bfloat16", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
      "bnb_4bit_use_double_quant": False},
     {"quantization": {"compute_dtype": "bf16", "mode": "4bit", "quant_type": "fp4", "double_quant": False}}),
], ids=["loraforge-names", "quantization", "axolotl-qlora", "load_in_4bit", "load_in_8bit", "bnb_4bit"])
def test_loraforge_and_quantization_names_in_a_flat_config_are_carried(tmp_path, monkeypatch, flat, expected):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]}] * 4)
    source = tmp_path / "flat.yaml"
    source.write_text(yaml.safe_dump({"model_name": "smollm2-135m-instruct", "dataset_path": "chat.jsonl", **flat}))
    migration, _ = write_migrated(source, tmp_path / "out.yaml", first_row)
    every_key_is_listed(source, migration)
    assert not [row for row in migration.rows if "unknown to loraforge" in row[1]], migration.table()
    carried = {k: v for k, v in migration.config.items() if k not in ("model",)}
    carried["data"] = {k: v for k, v in carried["data"].items() if k != "sources"}
    assert carried == {"data": {}, **expected}
    load_config(tmp_path / "out.yaml")


@pytest.mark.parametrize("bits", [{"load_in_8bit": True}, {"quantization": "8bit"}, {}], ids=["8bit", "loraforge-8bit", "none"])
def test_four_bit_settings_of_a_source_that_is_not_4_bit_are_listed_not_carried(tmp_path, monkeypatch, bits):
    """bitsandbytes' 8-bit loading ignores bnb_4bit_*: the migrated config would be refused with them."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "qlora.yaml"
    source.write_text(yaml.safe_dump({"model_name": "smollm2-135m-instruct", **bits, "bnb_4bit_compute_dtype": "bfloat16",
                                      "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}))
    migration, _ = write_migrated(source, tmp_path / "out.yaml", first_row)
    every_key_is_listed(source, migration)
    rows = dict(migration.rows)
    why = "bitsandbytes' 8-bit loading does not have" if bits else "the base loads unquantized"
    assert all(why in rows[key] for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"))
    assert migration.config.get("quantization") == ("8bit" if bits else None)
    assert load_config(tmp_path / "out.yaml").quantization.mode == ("8bit" if bits else "none")


def test_a_data_path_beside_the_script_config_is_written_as_seen_from_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seeds = tmp_path / "seeds"
    (seeds / "data").mkdir(parents=True)
    write_jsonl(seeds / "data" / "pairs.jsonl", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}] * 3)
    source = seeds / "trl.yaml"
    source.write_text("model_name_or_path: smollm2-135m-instruct\ndataset_path: data/pairs.jsonl\n")
    migration = migrate(source, first_row)
    assert migration.config["data"]["sources"] == [{"path": "seeds/data/pairs.jsonl", "format": "preference"}]
    assert any("data/pairs.jsonl is not in this folder but beside" in note and "written as seeds/data/pairs.jsonl" in note
               for note in migration.notes)
    monkeypatch.chdir(seeds)
    assert migrate(source, first_row).config["data"]["sources"][0]["path"] == "data/pairs.jsonl", "found here: kept as given"


def test_a_trl_preference_script_config_migrates_to_its_method(tmp_path, monkeypatch):
    """TRL's DPO and KTO scripts are the method: the config names none, the data's shape says which; beta and the
    loss (a name, or TRL's list of one) are carried; a loss loraforge does not train is listed, not dropped."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}] * 8)
    write_jsonl(tmp_path / "labelled.jsonl", [{"prompt": "Say hi", "completion": "hi", "label": True}] * 8)
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text("model_name_or_path: smollm2-135m-instruct\ndataset_name: pairs.jsonl\nbeta: '0.2'\n"
                   "loss_type: [ipo]\nlearning_rate: 5.0e-7\nmax_length: 256\n")
    migration, _ = write_migrated(dpo, tmp_path / "dpo-migrated.yaml", first_row)
    every_key_is_listed(dpo, migration)
    config = load_config(tmp_path / "dpo-migrated.yaml")
    assert (config.method, config.preference.beta, config.preference.loss_type) == ("dpo", 0.2, "ipo")
    assert config.data.sources[0].format.value == "preference" and config.data.max_length == 256
    assert any(note.startswith("method dpo: the data holds pairs (orpo and kto") for note in migration.notes)

    kto = tmp_path / "kto.yaml"
    kto.write_text("model_name_or_path: smollm2-135m-instruct\ndataset_name: labelled.jsonl\nloss_type: apo_zero\n")
    migration, _ = write_migrated(kto, tmp_path / "kto-migrated.yaml", first_row)
    every_key_is_listed(kto, migration)
    assert load_config(tmp_path / "kto-migrated.yaml").method == "kto"
    assert "method kto: the data holds answers labelled good or bad and the source names no method" in migration.notes
    assert dict(migration.rows)["loss_type"].startswith("not carried: 'apo_zero' is not one of")

    orpo = tmp_path / "orpo.yaml"
    orpo.write_text("base_model: smollm2-135m-instruct\nrl: orpo\ndataset_path: pairs.jsonl\n")
    migration, _ = write_migrated(orpo, tmp_path / "orpo-migrated.yaml", first_row)
    assert load_config(tmp_path / "orpo-migrated.yaml").method == "orpo", "a method the source names is kept"


def test_cli_writes_once_and_never_over_an_existing_file(tmp_path, capsys):
    source = SEED_FILES[0]
    out = tmp_path / "lf.yaml"
    assert main(["config", "migrate", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training.save_steps" in printed and "train.save_every: 500" in printed and f"loraforge train {out}" in printed
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    assert main(["config", "migrate", str(source), "--out", str(out)]) == 2
    assert f"--out {out} already exists" in capsys.readouterr().err
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert main(["config", "migrate", str(source)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["save_every"] == 500


def test_a_training_arguments_dump_migrates(tmp_path):
    from transformers import TrainingArguments

    dumped = json.loads(TrainingArguments(output_dir="out", save_strategy="epoch", eval_strategy="epoch",
                                          warmup_steps=0.1, num_train_epochs=2).to_json_string())
    source = tmp_path / "args.json"
    source.write_text(json.dumps({**dumped, "model_name_or_path": "smollm2-135m-instruct", "train_file": "d.jsonl"}))
    migration, _ = write_migrated(source, None, first_row)
    every_key_is_listed(source, migration)
    train = migration.config["train"]
    assert train["save_every"] == "epoch" and train["eval_every"] == "epoch", "the strategies, not save_steps"
    assert train["warmup_ratio"] == pytest.approx(0.1) and "warmup_steps" not in train and train["num_epochs"] == 2
    assert dict(migration.rows)["max_steps"].startswith("not carried: -1"), "-1: train by epochs"


def test_hostile_script_configs_are_messages(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} {{{', '.join(f'k{i}: *{p}' for i in range(10))}}}\n" for p, n in zip("abcdef", "bcdefg")))
    with pytest.raises(ConfigError, match="aliases here expand to more than"):
        migrate(bomb, first_row)
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a {b: *a}\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        migrate(loop, first_row)
    odd = tmp_path / "odd.yaml"
    odd.write_text("model_name: smollm2-135m-instruct\ntrain_file: d.jsonl\nrun_name: 2024-05-01\n"
                   "optim: [adamw_torch]\n")
    rows = dict(migrate(odd, first_row).rows)
    assert rows["run_name"] == 'tracking.wandb.run_name: "2024-05-01"' and rows["optim"].startswith("not carried")
    listed = tmp_path / "listed.yaml"
    listed.write_text("_extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match="_extends must name one file"):
        migrate(listed, first_row)


def test_a_migrated_config_that_would_not_validate_is_not_written(tmp_path):
    source = tmp_path / "bad.yaml"
    source.write_text("model_name: smollm2-135m-instruct\nlearning_rate: -1\ntrain_file: d.jsonl\n")
    with pytest.raises(ConfigError, match=r"learning_rate \(carried to train.learning_rate\): "):
        write_migrated(source, tmp_path / "out.yaml", first_row)
    assert not (tmp_path / "out.yaml").exists()


@pytest.fixture(scope="module")
def deep_tiny_model(tmp_path_factory, tokenizer) -> Path:
    """A random 25-layer llama, narrow enough to train in seconds, deep enough for the seeds' layer variants."""
    return save_tiny_llama(tmp_path_factory.mktemp("deep-tiny-llama"), tokenizer, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=25, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=4096)


ROWS = {
    "messages": lambda i: {"messages": [{"role": "user", "content": f"Echo {i}"},
                                        {"role": "assistant", "content": f"{i} {i}"}]},
    "text": lambda i: {"text": f"Number {i} follows {i - 1}."},
}


@pytest.mark.integration
@pytest.mark.parametrize("source", SEED_FILES, ids=[p.name for p in SEED_FILES])
def test_every_migrated_seed_config_trains_two_steps(source, tmp_path, deep_tiny_model, monkeypatch):
    from loraforge.training.run import run_training

    migration, _ = write_migrated(source, tmp_path / "migrated.yaml", first_row)
    monkeypatch.chdir(tmp_path)
    for data in migration.config["data"]["sources"]:
        (tmp_path / data["path"]).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / data["path"], [ROWS[data["format"]](i) for i in range(24)])
    # The migrated config as it is, on a small deep model, for 2 steps, without reporting to wandb.
    config = load_config(tmp_path / "migrated.yaml", [f"model.name={deep_tiny_model}", "train.max_steps=2",
                                                       "train.num_epochs=null", "report_to=[]", "eval.max_new_tokens=2",
                                                       f"output_dir={tmp_path / 'run'}", "eval.num_samples=0"])
    result = run_training(config)
    assert json.loads((result.run_dir / "manifest.json").read_text())["steps"] == 2


def test_fractions_of_the_run_as_step_counts_are_listed_and_a_script_config_given_to_train_points_at_migrate(tmp_path):
    source = tmp_path / "args.yaml"
    source.write_text("model_name_or_path: smollm2-135m-instruct\nlogging_steps: 0.1\nsave_steps: 0.25\n"
                      "eval_steps: 20\nlearning_rate: 1.0e-4\n")
    rows = dict(migrate(source, first_row).rows)
    assert rows["logging_steps"].startswith("not carried: 0.1: a fraction of the run's steps")
    assert rows["save_steps"].startswith("not carried: 0.25: a fraction of the run's steps")
    assert rows["eval_steps"] == "train.eval_every: 20"
    with pytest.raises(ConfigError) as error:
        load_config(source)
    assert error.value.problems[-1] == (f"{source}: 5 keys are named as a fine-tuning script names them: "
                                        f"`loraforge config migrate {source}` writes the loraforge config they mean")
    own = tmp_path / "own.yaml"
    own.write_text("data: {sources: [{path: d.jsonl}]}\n")
    with pytest.raises(ConfigError) as error:
        load_config(own, ["num_train_epochs=2", "per_device_train_batch_size=2", "learning_rate=1e-4"])
    assert len(error.value.problems) == 3 and "config migrate" not in str(error.value), (
        "script names given as overrides are told their keys; the file, a loraforge config, has nothing to migrate")
    assert "command line 'num_train_epochs=2': num_train_epochs: unknown key; did you mean 'train.num_epochs'?" in (
        error.value.problems[0])


def test_values_loraforge_refuses_beside_the_method_are_listed_not_carried_and_the_rest_migrates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    source = tmp_path / "dpo.yaml"
    source.write_text("model_name_or_path: smollm2-135m-instruct\nlora_dropout: 0.05\nlora_r: 8\n"
                      "metric_for_best_model: accuracy\ntrain_file: pairs.jsonl\n")
    migration, text = write_migrated(source, tmp_path / "out.yaml", first_row)
    rows = dict(migration.rows)
    assert rows["lora_dropout"].startswith("not carried: lora.dropout 0.05: method dpo runs without dropout")
    assert rows["metric_for_best_model"].startswith("not carried: train.best_metric: 'eval_accuracy' is not a metric")
    config = load_config(tmp_path / "out.yaml")
    assert config.method == "dpo" and config.lora.r == 8 and config.lora.dropout == 0.0
    every_key_is_listed(source, migration)
    source.write_text(source.read_text().replace("metric_for_best_model: accuracy", "metric_for_best_model: blue"))
    with pytest.raises(ConfigError, match=r"metric_for_best_model \(carried to train.best_metric\): .*'eval_blue'"):
        write_migrated(source, tmp_path / "blue.yaml", first_row)
    assert not (tmp_path / "blue.yaml").exists(), "a metric no run reports is wrong in itself: nothing written"


def test_peft_seq_cls_and_trls_text_field_say_what_the_data_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "reviews.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    write_jsonl(tmp_path / "corpus.jsonl", [{"content": "Some text to continue."}])
    classifier = tmp_path / "cls.yaml"
    classifier.write_text("model_name_or_path: smollm2-135m-instruct\ntask_type: SEQ_CLS\ntrain_file: reviews.jsonl\n")
    migration, _ = write_migrated(classifier, tmp_path / "cls-out.yaml", first_row)
    config = load_config(tmp_path / "cls-out.yaml")
    assert config.task == "classification" and config.data.sources[0].format.value == "classification"
    sft = tmp_path / "sft.yaml"
    sft.write_text("model_name_or_path: smollm2-135m-instruct\ndataset_text_field: content\ntrain_file: corpus.jsonl\n")
    migration, _ = write_migrated(sft, tmp_path / "sft-out.yaml", first_row)
    source = load_config(tmp_path / "sft-out.yaml").data.sources[0]
    assert source.format.value == "text" and source.fields == {"text": "content"}


def test_unreadable_sources_and_outputs_are_messages_naming_the_file(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:1: not UTF-8 text"):
        migrate(latin, first_row)
    twice = tmp_path / "twice.yaml"
    twice.write_text("learning_rate: 1e-4\nlearning_rate: 2e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:2: learning_rate is given twice \(first at .*twice.yaml:1\)"):
        migrate(twice, first_row)
    twice_json = tmp_path / "twice.json"
    twice_json.write_text('{"learning_rate": 1e-4, "learning_rate": 2e-4}')
    with pytest.raises(ConfigError, match="'learning_rate' is given twice"):
        migrate(twice_json, first_row)
    with pytest.raises(ConfigError, match="is a directory"):
        migrate(tmp_path, first_row)
    good = tmp_path / "good.yaml"
    good.write_text("model_name: smollm2-135m-instruct\n")
    with pytest.raises(ConfigError, match=r"latin.yaml is a file, not a folder"):
        write_migrated(good, latin / "out.yaml", first_row)


def test_a_loraforge_config_is_not_migrated_and_loraforges_own_keys_in_a_script_config_pass_through(tmp_path,
                                                                                                  monkeypatch):
    default = ROOT / "configs" / "default.yaml"
    with pytest.raises(ConfigError, match=r"default.yaml is a loraforge config already: .*`loraforge config validate"):
        migrate(default, first_row)
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "mine.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]}] * 4)
    own = yaml.safe_load(default.read_text())
    own["data"]["sources"] = [{"path": "mine.jsonl", "format": "messages"}]
    own["train"].update(eval_every="epoch", save_every=None)
    own["model"].update(variant="keep_layers", keep_layers=1)
    source = tmp_path / "mixed.yaml"
    source.write_text(yaml.safe_dump({**own, "gradient_accumulation_steps": 8}, sort_keys=False))
    with pytest.raises(ConfigError, match=r"train.grad_accum and gradient_accumulation_steps both give train.grad_accum "
                                          r"\(2 and 8\); keep one"):
        migrate(source, first_row)
    del own["train"]["grad_accum"], own["train"]["learning_rate"]
    source.write_text(yaml.safe_dump({**own, "gradient_accumulation_steps": 8, "lr": "1e-4"}))
    migration, _ = write_migrated(source, tmp_path / "out.yaml", first_row)
    every_key_is_listed(source, migration)
    assert not [row for row in migration.rows if row[1].startswith("not carried")], migration.table()
    config = load_config(tmp_path / "out.yaml")
    assert [s.path for s in config.data.sources] == ["mine.jsonl"], "the data named, not a placeholder"
    assert (config.data.val_fraction, config.train.lr_scheduler, config.train.micro_batch_tokens) == (
        own["data"]["val_fraction"], own["train"]["lr_scheduler"], own["train"]["micro_batch_tokens"])
    assert config.train.eval_every == "epoch" and config.train.save_every is None and config.model.keep_layers == 1
    assert config.train.grad_accum == 8 and config.train.learning_rate == pytest.approx(1e-4)


def test_csv_parquet_and_json_data_are_read_as_training_reads_them_and_what_is_left_to_do_is_said(tmp_path, monkeypatch,
                                                                                                  capsys):
    from datasets import Dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.csv").write_text('instruction,input,output\n"Hi, there",,hello\n', encoding="utf-8")
    Dataset.from_list([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}]).to_parquet(tmp_path / "pairs.parquet")
    write_jsonl(tmp_path / "lines.json", [{"text": "a"}, {"text": "b"}])
    (tmp_path / "cut.json").write_text('[{"text": "a"},\n{"text": ', encoding="utf-8")
    found = {}
    for data in ("rows.csv", "pairs.parquet", "lines.json", "cut.json"):
        source = tmp_path / f"{data}.yaml"
        source.write_text(f"model_name_or_path: smollm2-135m-instruct\ntrain_file: {data}\n")
        migration = migrate(source, first_row)
        found[data] = (migration.config["data"]["sources"][0]["format"], migration.notes[0])
    assert found["rows.csv"] == ("alpaca", "train_file: format alpaca (first row of rows.csv has "
                                                "['instruction', 'output'])")
    assert found["pairs.parquet"][0] == "preference" and "first row of pairs.parquet" in found["pairs.parquet"][1]
    assert found["lines.json"] == ("text", "train_file: format text (first row of lines.json has 'text')")
    assert "not found" not in found["cut.json"][1] and "cut.json:2: not valid JSON" in found["cut.json"][1]
    out = tmp_path / "cut-migrated.yaml"
    assert main(["config", "migrate", str(tmp_path / "cut.json.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"left to do before `loraforge train {out}`:\n  - data.sources[0].path: cut.json:2: not valid JSON" in printed
    assert printed.split("left to do")[1].count("not valid JSON") == 1, (
        "left to do once, though both the migration and validation read the rows")
    assert "valid:" not in printed
    placeholder = tmp_path / "no-data.yaml"
    placeholder.write_text("model_name_or_path: smollm2-135m-instruct\nlearning_rate: 1.0e-4\n")
    assert main(["config", "migrate", str(placeholder), "--out", str(tmp_path / "no-data-migrated.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "left to do before" in printed and "data.sources[0].path: data/train.jsonl: data file not found" in printed
    assert main(["config", "validate", str(tmp_path / "no-data-migrated.yaml")]) == 2, "what migrate said is left"
    assert main(["config", "migrate", str(tmp_path / "rows.csv.yaml"), "--out", str(tmp_path / "csv.yaml")]) == 0
    assert f"valid: loraforge train {tmp_path / 'csv.yaml'}" in capsys.readouterr().out
    assert main(["config", "validate", str(tmp_path / "csv.yaml")]) == 0
