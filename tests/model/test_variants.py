"""Model variants on the tiny llama: QLoRA, DoRA/rsLoRA, full fine-tuning, precision, layer variants."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.errors import ConfigError, ModelError
from loraforge.model.load import load_model
from loraforge.model.variants import apply_variant


def adapter_weights(config):
    return load_file(Path(config.output_dir) / "adapter" / "adapter_model.safetensors")


def test_qlora_4bit_trains_on_cpu_with_evaluation_between_steps(train_tiny):
    config, result = train_tiny("quantization=4bit")
    assert result.eval_after < result.eval_before
    assert all(w.abs().sum() > 0 for n, w in adapter_weights(config).items() if "lora_B" in n)


def test_eval_of_a_qlora_run_repeats_its_end_of_training_figures(train_tiny):
    """peft prepares a 4-bit model for training with its unquantized weights (embeddings, norms, head) in fp32;
    eval rebuilds it the same way, in the precision it trained in (bf16 here, on any CPU)."""
    from loraforge.eval.run import run_eval

    precision = "bf16"
    config, _ = train_tiny("quantization=4bit", f"precision={precision}", "train.max_steps=2",
                           "data.test_fraction=0.25", "eval.test_generations=0")
    test = json.loads((Path(config.output_dir) / "eval.json").read_text())["test"]
    again = run_eval(config.output_dir, split="test", max_samples=0)
    assert again["precision"] == precision
    assert again["fine_tuned"]["loss"] == pytest.approx(test["loss"], rel=1e-5)
    from loraforge.trained import load_run

    model = load_run(config.output_dir, precision=precision).model
    assert {p.dtype for p in model.parameters() if type(p).__name__ != "Params4bit"} == {torch.float32}, (
        "what bitsandbytes leaves unquantized is fp32, as in training")


def test_evaluation_does_not_break_4bit_training_gradients(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval forward; training after that
    got zero gradients. loraforge turns the repack off, so gradients are the same with or without an eval."""
    from loraforge.model.adapters import apply_lora
    from loraforge.model.quantize import bnb_config

    def gradient_norm(eval_first: bool) -> float:
        torch.manual_seed(0)
        from bitsandbytes.functional import has_avx512bf16

        from loraforge.internals import keep_cpu_4bit_trainable

        model = load_model(str(tiny_model_dir), quantization=bnb_config("4bit", "nf4", True, torch.float32))
        assert keep_cpu_4bit_trainable(model) == (14 if has_avx512bf16() else 0), "2 layers x 7 projections"
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none",
                           quantized=True)
        ids = torch.arange(16).reshape(2, 8) + 5
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.norm() for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert len(grads) == sum(p.requires_grad for p in model.parameters())
        return float(torch.stack(grads).norm())

    plain, after_eval = gradient_norm(False), gradient_norm(True)
    assert after_eval > 0 and after_eval == pytest.approx(plain, rel=1e-4)


def test_qlora_8bit_trains(train_tiny):
    config, result = train_tiny("quantization=8bit", "train.max_steps=3", "train.eval_every=3")
    assert result.eval_after < result.eval_before


def test_dora_and_rslora_are_saved_in_the_adapter_config(train_tiny):
    config, result = train_tiny("lora.use_dora=true", "lora.use_rslora=true")
    saved = json.loads((Path(config.output_dir) / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    assert any("lora_magnitude_vector" in n for n in adapter_weights(config))
    assert result.eval_after < result.eval_before


def test_modules_to_save_trains_the_head(train_tiny):
    config, _ = train_tiny("lora.modules_to_save=[lm_head]")
    assert any("lm_head" in n for n in adapter_weights(config))


def test_full_fine_tuning_moves_every_weight(train_tiny, tiny_model_dir):
    config, result = train_tiny("adapter=full", "train.learning_rate=1e-3")
    folder = Path(config.output_dir) / "model"
    assert (folder / "config.json").is_file() and not (Path(config.output_dir) / "adapter").exists()
    tuned = load_file(folder / "model.safetensors")
    original = load_file(Path(tiny_model_dir) / "model.safetensors")
    same = [n for n in original if n in tuned and torch.equal(original[n], tuned[n])]
    assert not same, f"weights that did not move: {same}"
    assert result.eval_after < result.eval_before
    assert result.samples[0]["prompt"] == "Echo red"


def test_full_fine_tuned_run_chats(train_tiny, capsys):
    from loraforge.cli import main

    config, _ = train_tiny("adapter=full", "train.max_steps=2")
    assert main(["chat", config.output_dir, "--prompt", "Echo red", "--max-new-tokens", "2"]) == 0


def test_bf16_keeps_trainable_weights_fp32(train_tiny):
    config, result = train_tiny("precision=bf16")
    assert all(w.dtype == torch.float32 for w in adapter_weights(config).values())
    assert result.eval_after < result.eval_before


def test_fp16_is_refused_on_cpu(train_tiny):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(ConfigError, match="fp16 on a CPU"):
        train_tiny("precision=fp16")


def test_8bit_optimizer_is_refused_on_cpu(train_tiny):
    if torch.cuda.is_available():
        pytest.skip("8-bit optimizers run on a GPU")
    with pytest.raises(ConfigError, match="train.optimizer: paged_adamw_8bit.*needs a CUDA GPU"):
        train_tiny("train.optimizer=paged_adamw_8bit")


def test_gradient_checkpointing_gives_the_same_losses(train_tiny, monkeypatch):
    def losses(config):
        records = [json.loads(l) for l in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    from transformers import PreTrainedModel

    enabled = []
    real = PreTrainedModel.activation_checkpointing_enable

    def spy(self, *args, **kwargs):
        enabled.append(type(self).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", spy)
    plain, _ = train_tiny()
    assert not enabled
    checkpointed, _ = train_tiny("train.gradient_checkpointing=true")
    assert enabled, "the trainer switched activation checkpointing on"
    assert losses(checkpointed) == pytest.approx(losses(plain), rel=1e-4)


@pytest.mark.parametrize("variant, setting, kept", [("drop_layers", [1], [0]), ("keep_layers", 1, [0]),
                                                    ("drop_layers", [0], [1])])
def test_layer_variant_saves_and_reloads_with_plain_transformers(tiny_model_dir, tmp_path, variant, setting, kept):
    from transformers import AutoModelForCausalLM

    original = load_model(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    apply_variant(model, variant, setting if variant == "drop_layers" else [], setting if variant == "keep_layers" else None)
    assert model.config.num_hidden_layers == len(model.model.layers) == len(kept)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(len(kept)))
    for new, old in enumerate(kept):
        assert torch.equal(model.model.layers[new].self_attn.q_proj.weight, original.model.layers[old].self_attn.q_proj.weight)
    model.save_pretrained(tmp_path / "variant")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "variant")
    assert reloaded.config.num_hidden_layers == len(kept)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
        cached = reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = reloaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached), "KV cache indices agree with the renumbered layers"


def test_layer_variant_errors(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    with pytest.raises(ModelError, match=r"out of range: the model has 2 layers"):
        apply_variant(model, "drop_layers", [5], None)
    with pytest.raises(ModelError, match="removes every decoder layer"):
        apply_variant(model, "drop_layers", [0, 1], None)


@pytest.mark.parametrize("overrides, said", [
    (["model.variant=drop_layers", "model.drop_layers=[5]"], "model.drop_layers [5] out of range: the model has 2 layers (0..1)"),
    (["model.variant=keep_layers", "model.keep_layers=3"], "model.keep_layers=3 but the model has only 2 layers")],
    ids=["drop_layers", "keep_layers"])
def test_layers_the_model_lacks_are_refused_from_its_config_before_the_data_is_prepared(
        tiny_model_dir, tmp_path, monkeypatch, capsys, overrides, said):
    from loraforge.cli import main
    from loraforge.config import load_config
    from loraforge.training import prepare as prepare_module
    from loraforge.training.run import run_training
    from tests.conftest import write_tiny_config

    path = write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1}")
    assert main(["config", "validate", str(path), *overrides]) == 2
    assert said in capsys.readouterr().err
    monkeypatch.setattr(prepare_module, "build_datasets", lambda *args, **kwargs: pytest.fail("the data was prepared first"))
    with pytest.raises(ModelError) as refused:
        run_training(load_config(path, [*overrides, f"output_dir={tmp_path / 'run'}"]))
    assert str(refused.value) == said
    assert not (tmp_path / "run").exists()


def test_variant_run_is_rebuilt_by_chat(train_tiny):
    from loraforge.trained import load_run

    config, _ = train_tiny("model.variant=drop_layers", "model.drop_layers=[1]")
    assert json.loads((Path(config.output_dir) / "adapter" / "adapter_config.json").read_text())
    model = load_run(config.output_dir).model
    assert model.config.num_hidden_layers == 1 and len(model.base_model.model.model.layers) == 1


def test_variant_config_errors(tmp_path):
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources: [{path: d.jsonl}]\nmodel:\n  variant: drop_layers\n")
    with pytest.raises(ConfigError, match="variant drop_layers needs model.drop_layers"):
        load_config(path)
    with pytest.raises(ConfigError, match="adapter full cannot train quantized weights"):
        load_config(path, ["model.variant=original", "adapter=full", "quantization=4bit"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "phi3", "llama"])
def test_layer_variants_across_decoder_families(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    apply_variant(model, "drop_layers", [1], None)
    assert model.config.num_hidden_layers == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
        cached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = reloaded.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
