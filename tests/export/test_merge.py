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
