"""Gated MLPs, down(silu(gate(x)) * up(x)), trained with two tensors kept for backward instead of three.

Written as transformers writes it, autograd keeps gate(x) for silu's backward and both silu(gate(x)) and up(x)
for the product's: three tensors of the MLP's width per token and layer, the largest share of a LoRA step's
activations (SmolLM2-135M, a 383-token row in fp32: 202 of 372 MB). silu(gate) is cheap to compute again from
gate, so the fused product keeps gate and up alone and recomputes it in backward: a third of the MLP's saved
activations, at the same speed (README, Memory on CPU). Only the MLP classes whose forward is that expression
are changed; tests/model/test_swiglu.py checks each against transformers' own forward.

Where the whole MLP is frozen (LoRA elsewhere) and runs in fp32 on the CPU, gate and up are kept rounded to bf16,
half their size: backward then computes the gradient for the MLP's input, in fp32, from those rounded values (to
within bf16's 8-bit precision, as autocast keeps activations), while forward's output stays bit for bit
transformers'. The default run in fp32 peaked 33 MB lower at the same speed and eval loss (README, Memory on CPU).
"""

import types

import torch
import torch.nn.functional as F

# transformers' gated MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (5.23).
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
SILU = frozenset({"SiLU", "SiLUActivation"})


class SiluProduct(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only (in bf16 where `compact`). Backward runs the ops autograd runs for
    the unfused product (the product's two gradients, silu's own backward) after computing silu(gate) again: the same
    numbers, unless compact."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, compact: bool) -> torch.Tensor:
        out = F.silu(gate).mul_(up)
        if compact:
            gate, up = gate.to(torch.bfloat16), up.to(torch.bfloat16)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = (kept.to(grad.dtype) for kept in ctx.saved_tensors)
        return torch.ops.aten.silu_backward(grad * up, gate), F.silu(gate).mul_(grad), None


def _compact(mlp, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not any(parameter.requires_grad for parameter in mlp.parameters()))


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluProduct.apply(self.gate_proj(x), self.up_proj(x), _compact(self, x)))


def fuse_gated_mlps(model) -> int:
    """Give every known SiLU-gated MLP of `model` the fused product; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in GATED_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed
