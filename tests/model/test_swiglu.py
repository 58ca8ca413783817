import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from loraforge.model.adapters import apply_lora
from loraforge.model.load import load_model
from loraforge.model.swiglu import GATED_MLPS, fuse_gated_mlps
from tests.model.ops import Ops

SHAPE = dict(hidden_size=32, intermediate_size=96)
FAMILIES = [(LlamaMLP, LlamaConfig), (MistralMLP, MistralConfig), (Qwen2MLP, Qwen2Config), (Qwen3MLP, Qwen3Config)]


def test_every_listed_class_is_tested():
    assert {mlp.__name__ for mlp, _ in FAMILIES} == GATED_MLPS


@pytest.mark.parametrize("mlp_class, config_class", FAMILIES, ids=[m.__name__ for m, _ in FAMILIES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mlp_gives_the_numbers_of_transformers_forward_and_backward(mlp_class, config_class, dtype):
    torch.manual_seed(0)
    original = mlp_class(config_class(**SHAPE)).to(dtype)
    fused = mlp_class(config_class(**SHAPE)).to(dtype)
    fused.load_state_dict(original.state_dict())
    assert fuse_gated_mlps(fused) == 1
    x = torch.randn(2, 5, 32, dtype=dtype)
    results = []
    for mlp in (original, fused):
        given = x.clone().requires_grad_()
        out = mlp(given)
        (out.float() * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out.float(), given.grad.float(), mlp.gate_proj.weight.grad.float(), mlp.up_proj.weight.grad.float()))
    for expected, got in zip(*results):
        assert torch.equal(got, expected), (got - expected).abs().max()


def saved_bytes(model, ids) -> int:
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def lora_step(tiny_model_dir, ids, fuse: bool, dtype=torch.float32):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_model_dir)).to(dtype), r=4, alpha=8, dropout=0.0,
                       target_modules=["q_proj", "v_proj"], bias="none")
    if fuse:
        assert fuse_gated_mlps(model) == 2
    return saved_bytes(model, ids), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_a_lora_step_in_bf16_keeps_one_mlp_width_tensor_less_per_layer_and_learns_the_same(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 40))
    (plain_bytes, plain_grads), (fused_bytes, fused_grads) = (
        lora_step(tiny_model_dir, ids, fuse, torch.bfloat16) for fuse in (False, True))
    layers, width = 2, 128
    assert plain_bytes - fused_bytes == layers * ids.numel() * width * 2
    for name, grad in plain_grads.items():
        assert torch.equal(fused_grads[name], grad), name


def test_a_frozen_mlp_in_fp32_keeps_gate_and_up_in_bf16_and_learns_within_their_rounding(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 40))
    (plain_bytes, plain_grads), (fused_bytes, fused_grads) = (
        lora_step(tiny_model_dir, ids, fuse) for fuse in (False, True))
    layers, width = 2, 128
    assert plain_bytes - fused_bytes == layers * ids.numel() * width * (3 * 4 - 2 * 2)
    trained = {name: grad for name, grad in plain_grads.items() if "lora_B" in name}
    assert len(trained) == 4 and all(grad.norm() > 0 for grad in trained.values())
    for name, grad in trained.items():
        error = (fused_grads[name] - grad).norm() / grad.norm()
        assert error < 2 ** -8, (name, error)
    assert all(torch.equal(fused_grads[name], grad) for name, grad in plain_grads.items() if "lora_A" in name)


def test_a_trained_mlp_or_no_gradient_keeps_fp32(tiny_model_dir):
    """Only a frozen MLP whose backward will run casts gate and up: a trained one keeps them in fp32, and a pass
    without gradients (evaluation, generation) casts nothing."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(**SHAPE))
    fuse_gated_mlps(mlp)
    x = torch.randn(2, 5, 32, requires_grad=True)
    kept = {}
    for frozen in (False, True):
        mlp.requires_grad_(not frozen)
        dtypes = []

        def keep(tensor, dtypes=dtypes):
            dtypes.append(tensor.dtype)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            mlp(x)
        with torch.no_grad(), Ops() as ops:
            mlp(x)
        kept[frozen] = (dtypes.count(torch.bfloat16), "_to_copy.default" in ops.seen)
    assert kept == {False: (0, False), True: (2, False)}, kept


def test_other_activations_are_left_alone():
    config = LlamaConfig(**SHAPE, hidden_act="gelu")
    assert fuse_gated_mlps(LlamaMLP(config)) == 0
