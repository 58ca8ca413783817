import torch

from loraforge.model.adapters import apply_lora, parameter_counts
from loraforge.model.load import load_model


def test_lora_trains_only_the_adapter(tiny_model_dir):
    model = apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0,
                       target_modules=["q_proj", "v_proj"], bias="none")
    trainable, total = parameter_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)), "2 layers x (q: 64->64, v: 64->32), rank 4"
    assert trainable < total

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved == param.requires_grad, f"{name}: moved={moved}, trainable={param.requires_grad}"


def test_all_linear_targets_every_projection(tiny_model_dir):
    model = apply_lora(load_model(str(tiny_model_dir)), r=2, alpha=4, dropout=0.0, target_modules="all-linear", bias="none")
    wrapped = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_module_names_that_match_nothing_or_a_tied_head_are_refused(tiny_model_dir):
    import pytest

    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.modules_to_save: \['lm_heads'\] are not modules of this model"):
        apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"], bias="none",
                   modules_to_save=["lm_heads"])
    with pytest.raises(ConfigError, match="lm_head shares its weights with the input embeddings"):
        apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"],
                   bias="none")


def test_full_layers_trained_beside_lora_are_trained_in_fp32_over_a_bf16_base(train_tiny):
    """A bf16 lm_head copy rounds small updates away; the run trains and saves it in fp32."""
    from pathlib import Path

    from safetensors import safe_open

    config, _ = train_tiny("precision=bf16", "lora.modules_to_save=[lm_head]", "train.max_steps=1")
    assert config.lora.modules_to_save == ["lm_head"], "the config's own list is left as it was given"
    resolved = (Path(config.output_dir) / "resolved.yaml").read_text()
    assert "model.embed_tokens" not in resolved
    with safe_open(str(Path(config.output_dir) / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        dtypes = {name: saved.get_tensor(name).dtype for name in saved.keys()}
    heads = {name: dtype for name, dtype in dtypes.items() if "lora_" not in name}
    assert heads and set(heads.values()) == {torch.float32}, heads


def test_what_the_libraries_refuse_at_load_is_a_message(tiny_model_dir, tmp_path):
    import pytest
    from transformers import T5Config, T5ForConditionalGeneration

    from loraforge.errors import ConfigError, ModelError

    with pytest.raises(ModelError, match="attn_implementation 'flash_attention_2' .* needs a package"):
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        vocab_size=100)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelError, match="for causal language modelling: .*use a decoder model"):
        load_model(str(tmp_path / "t5"))
    with pytest.raises(ConfigError, match="lora.target_modules: Target module LlamaRMSNorm"):
        apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules=["input_layernorm"],
                   bias="none")


def test_a_wrong_target_on_gpt2_is_told_its_conv1d_projections(tmp_path, tokenizer):
    """GPT-2 keeps attention and MLP projections in transformers' Conv1D, not nn.Linear; the hint names them."""
    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel

    from loraforge.errors import ConfigError

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               vocab_size=len(tokenizer))).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError) as refused:
        apply_lora(load_model(str(tmp_path / "gpt2")), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"],
                   bias="none")
    assert "its linear layers are ['c_attn', 'c_fc', 'c_proj', 'lm_head']" in str(refused.value)
    model = apply_lora(load_model(str(tmp_path / "gpt2")), r=4, alpha=8, dropout=0.0,
                       target_modules=["c_attn", "c_fc", "c_proj"], bias="none")
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"c_attn", "c_fc", "c_proj"}
