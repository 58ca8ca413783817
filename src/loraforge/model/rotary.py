"""Rotary position embedding of q and k written into one new tensor each, for CPU training in fp32.

transformers computes q * cos + rotate_half(q) * sin as five tensors of q's size (the two products, the negated
half, the concatenation, the sum), and the same for k, of which only the sum outlives the call. On CPU, glibc leaves
such freed temporaries mostly unused by the next layer (README, Memory on CPU), so they add to the peak. Here each
result starts as q * cos, and each half takes the other half's product with sin in place, through one temporary of
half q's size: the same numbers bit for bit, so a model evaluated after training measures what training measured.
Backward applies the transposed rotation to the gradient with two addcmul_ and keeps only cos and sin, as autograd
does for transformers' expression. On SmolLM2-135M's shapes forward and backward also run about three times as fast.

transformers' attention classes call their module's apply_rotary_pos_emb by its global name. Each attention layer of a
model to train gets a copy of its class's forward whose globals name this function instead (a copy of the module's
globals taken once per class), so the transformers module itself and other models in the process are left as they
are. Only CPU tensors that are all float32 take this path; other devices and dtypes run transformers' function.
tests/model/test_rotary.py checks each known attention class against transformers' own forward.
"""

import functools
import types

import torch

# transformers' attention classes whose forward calls apply_rotary_pos_emb(q, k, cos, sin) of their module, which
# computes q * cos + rotate_half(q) * sin with rotate_half(x) = cat(-x2, x1) (5.23).
ROTARY_ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
GLOBAL = "apply_rotary_pos_emb"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rounded as transformers' expression rounds it, with one temporary of half x's
    size."""
    half = x.shape[-1] // 2
    out = x * cos
    product = torch.mul(x[..., half:], sin[..., :half])
    out[..., :half] -= product
    torch.mul(x[..., :half], sin[..., half:], out=product)
    out[..., half:] += product
    return out


def _rotate_back(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of _rotate's input: grad * cos + the transposed rotation of grad * sin."""
    half = grad.shape[-1] // 2
    out = grad * cos
    out[..., :half].addcmul_(grad[..., half:], sin[..., half:])
    out[..., half:].addcmul_(grad[..., :half], sin[..., :half], value=-1)
    return out


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate_back(grad_q, cos, sin), _rotate_back(grad_k, cos, sin), None, None


def _applies(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """All four float32 on the CPU, with cos and sin constants (no gradient for them is computed)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, cos, sin))
            and not (cos.requires_grad or sin.requires_grad))


def rotary_for(original):
    """apply_rotary_pos_emb with transformers' signature: the in-place path where it applies, else `original`."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not _applies(q, k, cos, sin):
            return original(q, k, cos, sin, unsqueeze_dim)
        return Rotary.apply(q, k, cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))

    return apply_rotary_pos_emb


@functools.cache
def _forward_of(cls):
    forward = cls.forward
    names = dict(forward.__globals__)
    names[GLOBAL] = rotary_for(names[GLOBAL])
    copy = types.FunctionType(forward.__code__, names, forward.__name__, forward.__defaults__, forward.__closure__)
    copy.__kwdefaults__ = forward.__kwdefaults__
    return functools.update_wrapper(copy, forward)


def fuse_rotary(model) -> int:
    """Give every known attention layer of `model` the in-place rotary embedding; returns how many were changed."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in ROTARY_ATTENTIONS and GLOBAL in getattr(cls.forward, "__globals__", {}):
            module.forward = types.MethodType(_forward_of(cls), module)
            changed += 1
    return changed
