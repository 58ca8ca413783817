"""RMSNorm with frozen weights, for CPU training in fp32: one new tensor in forward where transformers makes three.

transformers computes weight * (x * rsqrt(mean(x ** 2) + eps)): x ** 2, the normalized x and its product with the
weight are each a new tensor of x's size, and backward makes more. On CPU, glibc leaves such freed temporaries mostly
unused by the next layer (README, Memory on CPU), so they add to the peak. Here forward computes the same numbers with
the weight multiplied in place, keeping x and the per-row rsqrt as autograd does, and backward computes
grad_x = r * (g * w) - x * r**3 * mean(g * w * x) with two temporaries. On SmolLM2-135M's shapes forward and backward
also run about three times as fast. Only a norm whose weight is frozen (LoRA; full fine-tuning trains it) and whose
input and weight are float32 on the CPU takes this path; everything else runs transformers' forward.
tests/model/test_rms_norm.py checks each known class against transformers' own forward.
"""

import types

import torch

# transformers' RMSNorm classes whose forward is weight * (x * rsqrt(mean(x ** 2, -1) + variance_epsilon)) computed
# in float32 (5.23).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class FrozenRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        scaled = grad * weight
        dot = (scaled * x).mean(-1, keepdim=True).mul_(rstd.pow(3))
        return scaled.mul_(rstd).addcmul_(x, dot, value=-1), None, None


def _applies(norm, x: torch.Tensor) -> bool:
    weight = norm.weight
    return (not weight.requires_grad and x.device.type == weight.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32)


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not _applies(self, hidden_states):
        return type(self).forward(self, hidden_states)
    return FrozenRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Give every known RMSNorm of `model` the fused forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed
