import contextlib

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

from loraforge.model.rotary import ROTARY_ATTENTIONS, fuse_rotary
from tests.model.ops import Ops

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96)
FAMILIES = [(LlamaAttention, LlamaRotaryEmbedding, LlamaConfig), (MistralAttention, MistralRotaryEmbedding, MistralConfig),
            (Qwen2Attention, Qwen2RotaryEmbedding, Qwen2Config), (Qwen3Attention, Qwen3RotaryEmbedding, Qwen3Config)]
IDS = [attention.__name__ for attention, _, _ in FAMILIES]


def attention_pair(attention_class, config_class, dtype=torch.float32):
    config = config_class(**SHAPE)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    original = attention_class(config, layer_idx=0).to(dtype)
    fused = attention_class(config, layer_idx=0).to(dtype)
    fused.load_state_dict(original.state_dict())
    return config, original, fused


def run(attention, rotary, x, ops=None):
    """Output, input gradient and q/k weight gradients of one forward and backward at positions 0..n-1; with `ops`,
    the attention's forward and backward run inside it."""
    given = x.clone().requires_grad_()
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    cos, sin = rotary(given, positions)
    with ops or contextlib.nullcontext():
        return _forward_and_backward(attention, given, cos, sin)


def _forward_and_backward(attention, given, cos, sin):
    out, _ = attention(given, position_embeddings=(cos, sin), attention_mask=None)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = (given.grad, attention.q_proj.weight.grad, attention.k_proj.weight.grad)
    attention.zero_grad(set_to_none=True)
    return (out.detach(), *grads)


def test_every_listed_class_is_tested():
    assert set(IDS) == ROTARY_ATTENTIONS


@pytest.mark.parametrize("attention_class, rotary_class, config_class", FAMILIES, ids=IDS)
def test_fused_rotary_gives_the_numbers_of_transformers_forward_and_backward(attention_class, rotary_class, config_class):
    config, original, fused = attention_pair(attention_class, config_class)
    assert fuse_rotary(fused) == 1
    rotary = rotary_class(config)
    x = torch.randn(2, 7, 64)
    (out, *grads), (fused_out, *fused_grads) = run(original, rotary, x), run(fused, rotary, x)
    assert torch.equal(fused_out, out), "forward bit for bit: an evaluation after training measures what training did"
    for expected, got in zip(grads, fused_grads):
        torch.testing.assert_close(got, expected)


def ops_of(attention, rotary, x) -> list[str]:
    ops = Ops()
    run(attention, rotary, x, ops)
    return ops.seen


def test_q_and_k_are_rotated_without_the_concatenated_temporaries():
    config, original, fused = attention_pair(LlamaAttention, LlamaConfig)
    fuse_rotary(fused)
    rotary, x = LlamaRotaryEmbedding(config), torch.randn(2, 7, 64)
    plain, ours = ops_of(original, rotary, x), ops_of(fused, rotary, x)
    assert plain.count("cat.default") == 2 and "neg.default" in plain, plain
    assert "cat.default" not in ours and "neg.default" not in ours, ours
    assert ours.count("addcmul_.default") == 4, ours  # the gradients' two halves, for q and k


def test_bf16_runs_transformers_rotary_and_other_models_keep_theirs():
    original_function = modeling_llama.apply_rotary_pos_emb
    config, original, fused = attention_pair(LlamaAttention, LlamaConfig, torch.bfloat16)
    fuse_rotary(fused)
    rotary, x = LlamaRotaryEmbedding(config), torch.randn(2, 7, 64, dtype=torch.bfloat16)
    for expected, got in zip(run(original, rotary, x), run(fused, rotary, x)):
        assert torch.equal(got, expected)
    assert "cat.default" in ops_of(fused, rotary, x)
    assert modeling_llama.apply_rotary_pos_emb is original_function
    _, other, _ = attention_pair(LlamaAttention, LlamaConfig)
    assert "cat.default" in ops_of(other, LlamaRotaryEmbedding(config), x.float())


def test_a_run_trains_with_the_fused_rotary_and_norms(tmp_path, tiny_model_dir):
    from tests.conftest import write_tiny_config

    from loraforge.config import load_config
    from loraforge.training.build import trainable_model
    from loraforge.training.prepare import prepare

    config = load_config(write_tiny_config(tmp_path, tiny_model_dir, "{max_steps: 1}"), [f"output_dir={tmp_path / 'run'}"])
    model = trainable_model(config, prepare(config), "fp32")
    attentions = [m for m in model.modules() if type(m) is LlamaAttention]
    norms = [m for m in model.modules() if type(m) is modeling_llama.LlamaRMSNorm]
    assert len(attentions) == 2 and len(norms) == 5
    assert all(m.forward.__func__.__globals__["apply_rotary_pos_emb"].__module__ == "loraforge.model.rotary"
               for m in attentions)
    assert all(m.forward.__func__.__name__ == "_fused_forward" and m.forward.__func__.__module__ == "loraforge.model.rms_norm"
               for m in norms)
