import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from loraforge.model.rms_norm import RMS_NORMS, fuse_rms_norms
from tests.model.ops import Ops

FAMILIES = [LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm]


def norm_pair(norm_class, dtype=torch.float32, frozen=True):
    torch.manual_seed(0)
    original = norm_class(48, eps=1e-5).to(dtype)
    torch.nn.init.normal_(original.weight, mean=1.0, std=0.3)
    fused = norm_class(48, eps=1e-5).to(dtype)
    fused.load_state_dict(original.state_dict())
    for norm in (original, fused):
        norm.weight.requires_grad_(not frozen)
    return original, fused


def run(norm, x):
    given = x.clone().requires_grad_()
    out = norm(given)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), given.grad, norm.weight.grad


def test_every_listed_class_is_tested():
    assert {norm.__name__ for norm in FAMILIES} == RMS_NORMS


@pytest.mark.parametrize("norm_class", FAMILIES, ids=[n.__name__ for n in FAMILIES])
def test_fused_norm_gives_the_numbers_of_transformers_forward_and_backward(norm_class):
    original, fused = norm_pair(norm_class)
    assert fuse_rms_norms(fused) == 1
    x = torch.randn(3, 7, 48) * 4
    (out, grad, weight_grad), (fused_out, fused_grad, fused_weight_grad) = run(original, x), run(fused, x)
    assert torch.equal(fused_out, out)
    torch.testing.assert_close(fused_grad, grad)
    assert weight_grad is None and fused_weight_grad is None


def test_the_fused_forward_makes_one_tensor_of_the_input_size_less():
    original, fused = norm_pair(LlamaRMSNorm)
    fuse_rms_norms(fused)
    x = torch.randn(3, 7, 48)
    seen = []
    for norm in (original, fused):
        with Ops() as ops:
            norm(x)
        seen.append(ops.seen)
    plain, ours = seen
    assert plain.count("mul.Tensor") == 2 and ours.count("mul.Tensor") == 1 and "mul_.Tensor" in ours, (plain, ours)


def saved_for_backward(norm, x):
    """The data pointers of the tensors autograd keeps for backward while `norm` runs forward on `x`."""
    kept = []

    def pack(tensor):
        kept.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = norm(x)
    return out, kept


def test_the_fused_norm_keeps_its_output_for_backward_not_its_input():
    _, fused = norm_pair(LlamaRMSNorm)
    fuse_rms_norms(fused)
    x = torch.randn(3, 7, 48, requires_grad=True)
    out, kept = saved_for_backward(fused, x)
    assert out.data_ptr() in kept and x.data_ptr() not in kept


def test_a_pass_without_gradients_never_checks_the_weight():
    """In evaluation and generation the hidden states reaching a norm need no gradient."""
    _, fused = norm_pair(LlamaRMSNorm)
    fuse_rms_norms(fused)
    x = torch.randn(3, 7, 48, requires_grad=True)
    seen = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), Ops() as ops:
            fused(x * 2)
        seen.append("min.default" in ops.seen)
    assert seen == [True, False]


@pytest.mark.parametrize("tiny", [0.0, 1e-40], ids=["zero", "subnormal"])
def test_a_weight_that_cannot_divide_its_output_keeps_the_input_and_gives_the_same_gradient(tiny):
    original, fused = norm_pair(LlamaRMSNorm)
    with torch.no_grad():
        original.weight[5] = tiny
        fused.weight[5] = tiny
    fuse_rms_norms(fused)
    x = torch.randn(3, 7, 48) * 4
    (out, grad, _), (fused_out, fused_grad, _) = run(original, x), run(fused, x)
    assert torch.equal(fused_out, out)
    torch.testing.assert_close(fused_grad, grad)
    given = x.clone().requires_grad_()
    _, kept = saved_for_backward(fused, given)
    assert given.data_ptr() in kept


@pytest.mark.parametrize("dtype, frozen", [(torch.bfloat16, True), (torch.float32, False)], ids=["bf16", "trained weight"])
def test_other_cases_run_transformers_forward(dtype, frozen):
    original, fused = norm_pair(LlamaRMSNorm, dtype, frozen)
    fuse_rms_norms(fused)
    x = (torch.randn(3, 7, 48) * 4).to(dtype)
    for expected, got in zip(run(original, x), run(fused, x)):
        assert (got is None and expected is None) or torch.equal(got, expected)
    with Ops() as ops:
        fused(x)
    assert ops.seen.count("mul.Tensor") == 2, ops.seen
