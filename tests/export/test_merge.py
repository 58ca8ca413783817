"""`loraforge merge` on tiny runs: logits match the adapter, tied embeddings stay tied, variants and QLoRA merge."""

import json
from pathlib import Path

import pytest
import torch

from loraforge.errors import RunDirError
from loraforge.export.merge import run_merge


def plain_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_merged_model_matches_the_adapter(train_tiny, capsys):
    from loraforge.cli import main

    config, _ = train_tiny("train.max_steps=3")
    assert main(["merge", config.output_dir]) == 0
    assert "Max |logit difference|" in capsys.readouterr().out
    out = Path(config.output_dir) / "merged"
    record = json.loads((out / "merge.json").read_text())
    assert record["max_abs_logit_diff"] <= 1e-4
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    model = plain_load(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight), "tied after reload"
    assert (out / "chat_template.jinja").is_file(), "the tokenizer keeps its chat template"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_run_checkpoint_and_merge_has_the_mode_the_umask_gives(train_tiny, umask):
    """safetensors writes weights through a temporary file, owner-only (0600), while every other file had the
    umask's mode: a merged model another user or a container could read the config of, but not the weights."""
    import os
    import stat

    before = os.umask(umask)
    try:
        config, _ = train_tiny("train.max_steps=2", "train.save_every=2")
        result = run_merge(config.output_dir)
    finally:
        os.umask(before)
    run = Path(config.output_dir)
    modes = {str(path.relative_to(run)): stat.S_IMODE(path.stat().st_mode) for path in run.rglob("*") if path.is_file()}
    assert {"adapter/adapter_model.safetensors", "checkpoints/checkpoint-2/adapter_model.safetensors",
            f"{result.out_dir.relative_to(run)}/model.safetensors"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, {name: oct(mode) for name, mode in modes.items()}


def test_merge_changes_the_weights_it_should(train_tiny, tiny_model_dir):
    config, _ = train_tiny("train.max_steps=3")
    result = run_merge(config.output_dir, Path(config.output_dir) / "out")
    merged, base = plain_load(result.out_dir), plain_load(tiny_model_dir)
    q_changed = not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    mlp_same = torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert q_changed and mlp_same


def test_qlora_run_merges_onto_the_unquantized_base(train_tiny):
    config, _ = train_tiny("quantization=4bit", "train.max_steps=3")
    result = run_merge(config.output_dir)
    saved = json.loads((result.out_dir / "config.json").read_text())
    assert "quantization_config" not in saved
    model = plain_load(result.out_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.max_abs_logit_diff <= 1e-4


def test_layer_variant_merges_with_its_layer_count(train_tiny):
    config, _ = train_tiny("model.variant=drop_layers", "model.drop_layers=[0]", "train.max_steps=3")
    result = run_merge(config.output_dir)
    assert result.num_hidden_layers == 1
    assert plain_load(result.out_dir).config.num_hidden_layers == 1
    assert result.max_abs_logit_diff <= 1e-4


def test_full_run_has_nothing_to_merge(train_tiny):
    config, _ = train_tiny("adapter=full", "train.max_steps=2")
    with pytest.raises(RunDirError, match="already merged"):
        run_merge(config.output_dir)


def test_a_stopped_merge_is_redone_and_another_runs_or_edited_files_are_refused(train_tiny, monkeypatch):
    from loraforge.errors import ExportError
    from loraforge import ledger
    from loraforge.export import merge

    a, _ = train_tiny("train.max_steps=2")
    b, _ = train_tiny("train.max_steps=3")
    run_a, run_b = Path(a.output_dir), Path(b.output_dir)
    merged = run_a / "merged"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as a signal would, once the weights are saved and before merge.json

    with monkeypatch.context() as patch:
        patch.setattr(merge, "load_model", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_merge(run_a)
    assert (merged / "model.safetensors").is_file() and not (merged / "merge.json").exists()
    assert not ledger.written(merged, "model.safetensors"), "a stopped merge is not taken for a finished one"
    assert run_merge(run_a).max_abs_logit_diff <= 1e-4, "the next merge redoes it in the same folder"
    assert ledger.written(merged, "merge.json") and ledger.written(merged, "model.safetensors")

    files = {p: p.read_bytes() for p in merged.iterdir()}
    with pytest.raises(ExportError, match="holds the merged model of another run"):
        run_merge(run_b, merged)
    template = merged / "chat_template.jinja"
    template.write_text(template.read_text() + "{# my edit #}")
    files[template] = template.read_bytes()
    with pytest.raises(ExportError, match=r"did not write, or that changed since it wrote them \(chat_template.jinja\)"):
        run_merge(run_a)
    assert {p: p.read_bytes() for p in merged.iterdir()} == files, "nothing rewritten"


def test_the_merged_template_adds_the_runs_system_prompt_as_training_did(train_tiny):
    from transformers import AutoTokenizer

    from loraforge.eval.generate import prompt_messages
    from loraforge.model.load import load_tokenizer

    config, _ = train_tiny("train.max_steps=1", "data.system_prompt='Answer in \"two\" words; no more.'")
    run = Path(config.output_dir)
    run_merge(run)
    merged = AutoTokenizer.from_pretrained(run / "merged")
    trained = load_tokenizer(str(run / "tokenizer"))
    as_chat = trained.apply_chat_template(prompt_messages("Echo red", config.data.system_prompt), tokenize=False,
                                          add_generation_prompt=True)
    assert config.data.system_prompt == 'Answer in "two" words; no more.' and config.data.system_prompt in as_chat
    plain = [{"role": "user", "content": "Echo red"}]
    assert merged.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == as_chat, (
        "a chat without a system message gets the run's, as `loraforge chat` renders it")
    own = [{"role": "system", "content": "Be loud."}, *plain]
    assert (merged.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
            == trained.apply_chat_template(own, tokenize=False, add_generation_prompt=True)), "a system message given wins"


def test_a_run_trained_further_is_merged_again_and_a_moved_or_copied_run_keeps_its_merge(train_tiny, tmp_path):
    import shutil

    from loraforge.export.gguf import model_source
    from loraforge.export.merge import merge_record

    config, _ = train_tiny("train.max_steps=2", "train.save_every=2")
    run = Path(config.output_dir)
    merged = model_source(run)
    first = (merged / "model.safetensors").read_bytes()

    copy = tmp_path / "copied run"
    shutil.copytree(run, copy)
    record = (copy / "merged" / "merge.json").read_bytes()
    assert model_source(copy) == copy / "merged"
    assert (copy / "merged" / "merge.json").read_bytes() == record, "the copy's merge is its own: not redone"
    assert run_merge(copy).max_abs_logit_diff <= 1e-4, "merging the copy again is not refused as another run's"

    from loraforge.config import load_config
    from loraforge.training.run import run_training

    further = load_config(Path(config.output_dir) / "resolved.yaml", ["train.max_steps=4"])
    run_training(further, resume="auto", allow_changes=True)
    assert model_source(run) == merged
    assert (merged / "model.safetensors").read_bytes() != first, "the merge is redone from the adapter trained further"
    assert merge_record(merged)["run_dir"] == str(run.resolve())


def test_a_full_fine_tune_saves_a_model_folder_that_answers_with_the_runs_system_prompt(train_tiny):
    from transformers import AutoTokenizer

    config, _ = train_tiny("adapter=full", "train.max_steps=1", "data.system_prompt=Answer in two words.")
    model_dir = Path(config.output_dir) / "model"
    plain = AutoTokenizer.from_pretrained(model_dir)
    rendered = plain.apply_chat_template([{"role": "user", "content": "Echo red"}], tokenize=False)
    assert "Answer in two words." in rendered
    from loraforge.model.load import load_tokenizer

    assert "Answer in two words." not in (load_tokenizer(str(Path(config.output_dir) / "tokenizer")).chat_template or "")


def test_an_out_folder_holding_a_folder_or_that_cannot_be_made_is_refused_before_the_model_loads(train_tiny, tmp_path,
                                                                                               monkeypatch):
    from loraforge.errors import ExportError
    from loraforge.export import merge

    config, _ = train_tiny("train.max_steps=1")
    monkeypatch.setattr(merge, "load_run", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    holding = tmp_path / "holding"
    (holding / "sub").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"holds files loraforge did not write.*\(sub\)"):
        run_merge(config.output_dir, holding)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ExportError, match="cannot be made: .*a-file is a file"):
        run_merge(config.output_dir, tmp_path / "a-file" / "merged")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_16_bit_base_is_merged_into_a_model_of_its_size(tmp_path, tokenizer):
    from safetensors import safe_open

    from loraforge.config import load_config
    from loraforge.training.run import run_training
    from tests.conftest import save_tiny_llama, write_tiny_config

    base = save_tiny_llama(tmp_path / "bf16-base", tokenizer)
    plain = plain_load(base).to(torch.bfloat16)
    plain.save_pretrained(base)
    config_path = write_tiny_config(tmp_path, base, "{max_steps: 2, batch_size: 4, save_every: null}")
    run_training(load_config(config_path, [f"output_dir={tmp_path / 'run'}", "precision=fp32"]))
    result = run_merge(tmp_path / "run")
    assert result.dtype == "bfloat16" and "bfloat16 weights" in result.summary()
    with safe_open(str(result.out_dir / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert json.loads((result.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.max_abs_logit_diff < 0.05, "bf16 rounding of the merged weights, measured against the adapter"
