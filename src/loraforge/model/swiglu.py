"""Gated MLPs, down(silu(gate(x)) * up(x)), trained with two tensors kept for backward instead of three.

Written as transformers writes it, autograd keeps gate(x) for silu's backward and both silu(gate(x)) and up(x)
for the product's: three tensors of the MLP's width per token and layer, the largest share of a LoRA step's
activations (SmolLM2-135M, a 383-token row in fp32: 202 of 372 MB). silu(gate) is cheap to compute again from
gate, so the fused product keeps gate and up alone and recomputes it in backward: a third of the MLP's saved
activations, at the same speed (README, Memory on CPU). Only the MLP classes whose forward is that expression
are changed; tests/model/test_swiglu.py checks each against transformers' own forward.
"""

import types

import torch
import torch.nn.functional as F

# transformers' gated MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (5.23).
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"SiLU", "SiLUActivation"})


class SiluProduct(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only. Backward runs the ops autograd runs for the unfused product
    (the product's two gradients, silu's own backward) after computing silu(gate) again: the same numbers."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), F.silu(gate).mul_(grad)


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluProduct.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_gated_mlps(model) -> int:
    """Give every known SiLU-gated MLP of `model` the fused product; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed
