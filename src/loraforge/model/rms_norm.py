"""RMSNorm with frozen weights, for CPU training in fp32: one new tensor in forward where transformers makes three.

transformers computes weight * (x * rsqrt(mean(x ** 2) + eps)): x ** 2, the normalized x and its product with the
weight are each a new tensor of x's size, and backward makes more. On CPU, glibc leaves such freed temporaries mostly
unused by the next layer (README, Memory on CPU), so they add to the peak. Here forward computes the same numbers with
the weight multiplied in place, keeping its output y and the per-row rsqrt r, and backward computes
grad_x = r * (g * w - (y / w) * mean(g * w * y / w)) with three temporaries. Autograd would keep the input, a
tensor of its size more per norm wherever a LoRA layer follows and keeps y: 8 MB less at the default fp32 run's peak.
On SmolLM2-135M's shapes forward and backward also run about three times as fast. Only a norm whose weight is frozen
(LoRA; full fine-tuning trains it) and whose input and weight are float32 on the CPU takes this path; everything else
runs transformers' forward.
tests/model/test_rms_norm.py checks each known class against transformers' own forward.
"""

import types

import torch

# transformers' RMSNorm classes whose forward is weight * (x * rsqrt(mean(x ** 2, -1) + variance_epsilon)) computed
# in float32 (5.23).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class FrozenRMSNorm(torch.autograd.Function):
    """Keeps its output for backward, not its input: the layers after a norm (LoRA's first matmul) keep that output
    anyway, while nothing else keeps the input. The normalized input is the output divided by the weight, so a
    weight with a zero or subnormal entry keeps the input instead."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        out = (x * rstd).mul_(weight)
        ctx.keeps_output = ctx.needs_input_grad[0] and bool(weight.abs().min() >= torch.finfo(weight.dtype).tiny)
        ctx.save_for_backward(out if ctx.keeps_output else x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kept, rstd, weight = ctx.saved_tensors
        scaled = grad * weight
        if ctx.keeps_output:
            normed = kept / weight
            dot = (scaled * normed).mean(-1, keepdim=True)
            return scaled.addcmul_(normed, dot, value=-1).mul_(rstd), None, None
        dot = (scaled * kept).mean(-1, keepdim=True).mul_(rstd.pow(3))
        return scaled.mul_(rstd).addcmul_(kept, dot, value=-1), None, None


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
