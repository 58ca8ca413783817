"""Causal LM loss with the output head applied only where a token is trained.

The head of a small model is a large share of its work and memory: SmolLM2-135M projects every position onto
49,152 logits, and the fp32 copies the loss keeps for backward outweigh the rest of the activations. With
assistant-only labels most positions train nothing; their logits are never computed here.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from loraforge.data.render import IGNORE


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels shifted left by one: the token each position predicts, IGNORE where nothing is trained."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE)


def trained_tokens_per_row(dataset) -> float | None:
    """Mean count of trained next-token targets per row of a tokenized split; None without labels."""
    if "labels" not in (getattr(dataset, "column_names", None) or []) or len(dataset) == 0:
        return None
    counts = [sum(1 for t in labels[1:] if t != IGNORE) for labels in dataset["labels"]]
    return sum(counts) / len(counts)


@contextmanager
def head_at(model, keep: torch.Tensor):
    """Inside, the model's output head sees only the hidden states where `keep` (batch, sequence) is True,
    flattened to one row: logits come out (1, keep.sum(), vocabulary)."""
    head = model.get_output_embeddings()

    def select(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"output head input {tuple(hidden.shape)} does not match the labels {tuple(keep.shape)}")
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None, unwrapped=None):
    """(loss, outputs) of a causal LM batch: cross-entropy summed over trained positions and divided by
    num_items_in_batch (the trained tokens of the whole accumulated step) or, without it, averaged.

    `model` is called with everything but the labels; `outputs.logits` holds the trained positions only.
    `unwrapped` is the model that owns the output head when `model` is a distributed wrapper around it.
    """
    labels = inputs["labels"]
    targets = inputs["shift_labels"] if "shift_labels" in inputs else next_token_targets(labels)
    keep = targets != IGNORE
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    with head_at(unwrapped if unwrapped is not None else model, keep):
        outputs = model(**forward)
    logits = outputs.logits[0].float()
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor, outputs

