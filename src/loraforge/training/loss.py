"""Causal LM loss with the output head applied only where a token is trained.

The head of a small model is a large share of its work and memory: SmolLM2-135M projects every position onto
49,152 logits, and the fp32 copies the loss keeps for backward outweigh the rest of the activations. With
assistant-only labels most positions train nothing; their logits are never computed here. In training, with a
frozen linear head (LoRA leaves it frozen), even the trained positions' logits live one chunk at a time: the loss and
its gradient for the hidden states are computed together, chunk by chunk, in the forward.
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


# Trained positions whose logits are alive at once in the chunked loss: 64 x 49,152 fp32 logits are 12.6 MB
# (128: 33 MB more at an fp32 run's peak, the same speed; README, Memory on CPU).
CHUNK = 64


class ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T against targets, for a frozen head. The forward takes the positions
    CHUNK at a time and, while a chunk's logits exist, also computes its gradient for the hidden states (softmax
    minus one-hot, times the weight); backward only scales it. Logits are computed in the head's dtype (or
    autocast's: a bf16 run's autocast covers the model's forward, not this) and the loss in fp32, as the head and
    loss below do. A chunk's fp32 logits become its softmax in place (log-sum-exp from their largest value, as
    log_softmax computes it), so no second tensor of the vocabulary's width is built beside them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], CHUNK):
            piece, wanted = hidden[start : start + CHUNK], targets[start : start + CHUNK]
            logits = F.linear(piece.to(weight.dtype), weight)
            dtype = logits.dtype
            scores = logits.float()
            del logits
            rows = torch.arange(len(wanted), device=wanted.device)
            picked = scores[rows, wanted]
            largest = scores.amax(dim=-1, keepdim=True)
            sums = scores.sub_(largest).exp_().sum(dim=-1, keepdim=True)
            total += (largest + sums.log()).squeeze(-1).sub_(picked).sum()
            if grad is not None:
                probabilities = scores.div_(sums)
                probabilities[rows, wanted] -= 1
                grad[start : start + CHUNK] = (probabilities.to(dtype) @ weight.to(dtype)).to(grad.dtype)
            del scores
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def chunkable_head(model):
    """The model's output head when the chunked loss can stand in for it: a plain linear layer without bias whose
    weight is frozen, in training with gradients on; else None."""
    head = model.get_output_embeddings()
    if (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad and model.training
            and torch.is_grad_enabled()):
        return head
    return None


def _hidden_states(x, *args, **kwargs):
    return x


@contextmanager
def head_at(model, keep: torch.Tensor, skipped: bool = False):
    """Inside, the model's output head sees only the hidden states where `keep` (batch, sequence) is True,
    flattened to one row: logits come out (1, keep.sum(), vocabulary); with `skipped`, those hidden states come
    out instead, for ChunkedHeadLoss."""
    head = model.get_output_embeddings()

    def select(module, args):
        hidden = args[0]
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"output head input {tuple(hidden.shape)} does not match the labels {tuple(keep.shape)}")
        return (hidden[keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select)
    own_forward = head.__dict__.get("forward")
    if skipped:
        head.forward = _hidden_states
    try:
        yield
    finally:
        handle.remove()
        if skipped and own_forward is None:
            del head.forward
        elif skipped:
            head.forward = own_forward


def trained_positions_loss(model, inputs: dict, num_items_in_batch=None, unwrapped=None):
    """(loss, outputs) of a causal LM batch: cross-entropy summed over trained positions and divided by
    num_items_in_batch (the trained tokens of the whole accumulated step) or, without it, averaged.

    `model` is called with everything but the labels; `outputs.logits` holds the trained positions only (their
    final hidden states, not logits, where the chunked loss stood in for the head).
    `unwrapped` is the model that owns the output head when `model` is a distributed wrapper around it.
    """
    labels = inputs["labels"]
    targets = inputs["shift_labels"] if "shift_labels" in inputs else next_token_targets(labels)
    keep = targets != IGNORE
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
    owner = unwrapped if unwrapped is not None else model
    head = chunkable_head(owner)
    with head_at(owner, keep, skipped=head is not None):
        outputs = model(**forward)
    if head is not None:
        total = ChunkedHeadLoss.apply(outputs.logits[0], head.weight, targets[keep])
    else:
        total = F.cross_entropy(outputs.logits[0].float(), targets[keep], reduction="sum")
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor, outputs

