import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from loraforge.model.adapters import apply_lora
from loraforge.model.load import load_model
from loraforge.model.lora_linear import fuse_lora_linears
from tests.model.ops import Ops


def lora_model(model_dir, **options):
    torch.manual_seed(0)
    settings = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none") | options
    model = apply_lora(load_model(str(model_dir)), **settings)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def step(model, ids):
    """Loss, logits and the LoRA gradients of one forward and backward; dropout masks drawn from one seed."""
    torch.manual_seed(1)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("options", [{}, {"dropout": 0.1}, {"use_rslora": True}], ids=["plain", "dropout", "rslora"])
def test_in_place_forward_gives_peft_forward_and_backward_numbers(tiny_model_dir, options):
    ids = torch.randint(0, 1000, (2, 24))
    model = lora_model(tiny_model_dir, **options)
    expected = step(model, ids)
    assert fuse_lora_linears(model) == 4
    got = step(model, ids)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], msg=name)


def layer_ops(layer, x) -> list[str]:
    with Ops() as ops:
        layer(x)
    return ops.seen


def test_the_adapter_product_is_added_into_the_base_output_without_temporaries(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    plain = layer_ops(layer, x)
    fuse_lora_linears(model)
    fused = layer_ops(layer, x)
    assert "addmm_.default" in fused and "mul.Tensor" not in fused and "add.Tensor" not in fused, fused
    assert "mul.Tensor" in plain and "add.Tensor" in plain, plain


def test_other_cases_run_peft_forward(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 24))
    model = lora_model(tiny_model_dir)
    fuse_lora_linears(model)
    layer = next(m for m in model.modules() if type(m) is LoraLinear)
    x = torch.randn(2, 5, layer.in_features)
    with model.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))
        assert "addmm_.default" not in layer_ops(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops = layer_ops(layer, x)
        assert "addmm_.default" not in ops and "add.Tensor" in ops
    dora = lora_model(tiny_model_dir, use_dora=True)
    expected = step(dora, ids)
    assert fuse_lora_linears(dora) == 4
    assert "addmm_.default" not in layer_ops(next(m for m in dora.modules() if type(m) is LoraLinear), x)
    got = step(dora, ids)
    assert torch.equal(got[0], expected[0])


def test_a_run_trains_its_lora_layers_with_the_in_place_forward(tmp_path, tiny_model_dir):
    from tests.conftest import write_tiny_config

    from loraforge.config import load_config
    from loraforge.training.build import trainable_model
    from loraforge.training.prepare import prepare

    config = load_config(write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1}"), [f"output_dir={tmp_path / 'run'}"])
    model = trainable_model(config, prepare(config), "fp32")
    layers = [m for m in model.modules() if type(m) is LoraLinear]
    assert layers and all(m.forward.__func__.__name__ == "_in_place_forward" for m in layers)
