"""Layer-by-layer recompute (activation checkpointing) for one forward and backward: a row longer than the
micro-batch token budget cannot be cut into smaller slices of whole rows, so its decoder layers keep only their
inputs and run again in backward. Peak memory then follows the budget, not the longest row; rows within the budget
run as before."""

from contextlib import contextmanager
from functools import partial

from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


@contextmanager
def recomputed_layers(model, active: bool = True):
    """Inside, the decoder layers of `model` that do not checkpoint already do so (non-reentrant: a frozen
    embedding's output needs no grad); on leaving, each is as it was. Backward must run inside."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and not m.gradient_checkpointing]
    if not active or not layers:
        yield
        return
    saved = [m.__dict__.get("_gradient_checkpointing_func") for m in layers]
    for layer in layers:
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        layer.gradient_checkpointing = True
    try:
        yield
    finally:
        for layer, func in zip(layers, saved):
            del layer.gradient_checkpointing
            if func is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = func
