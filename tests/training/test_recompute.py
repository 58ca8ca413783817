"""A row longer than the micro-batch token budget recomputes its decoder layers in backward: the same gradients,
less kept for backward, and only for such rows."""

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from loraforge.model.adapters import apply_lora
from loraforge.model.load import load_model
from loraforge.training import recompute
from loraforge.training import trainer as trainer_module
from loraforge.training.recompute import recomputed_layers


def lora_model(path):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(path)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                       bias="none")
    return model.train()


def step(model, ids) -> tuple[int, dict]:
    """(bytes autograd keeps outside checkpointed layers, LoRA gradients) of one forward and backward through the
    decoder (the output head's logits would outweigh a tiny model's layers)."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
    (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def layer_states(model):
    return [(m.gradient_checkpointing, "_gradient_checkpointing_func" in m.__dict__)
            for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def test_recomputed_layers_give_the_same_gradients_keeping_far_less(tiny_model_dir):
    ids = torch.randint(0, 1000, (1, 64))
    model = lora_model(tiny_model_dir)
    kept, grads = step(model, ids)
    before = layer_states(model)
    assert before == [(False, False), (False, False)]
    model.zero_grad()
    with recomputed_layers(model):
        assert all(flag for flag, _ in layer_states(model))
        recomputed_kept, recomputed_grads = step(model, ids)
    assert layer_states(model) == before, "the layers are left as they were"
    assert recomputed_kept < kept / 3, (recomputed_kept, kept)
    assert grads.keys() == recomputed_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name


def test_layers_the_config_checkpoints_stay_so_and_inactive_changes_nothing(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    with recomputed_layers(model, active=False):
        assert layer_states(model) == [(False, False), (False, False)]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    configured = layer_states(model)
    assert configured == [(True, True), (True, True)]
    with recomputed_layers(model):
        pass
    assert layer_states(model) == configured


def test_training_recomputes_only_the_rows_over_the_budget(train_tiny, monkeypatch):
    """Short rows (about 20 tokens) and long ones (over 60) in every batch: with a budget of 40 tokens each row is
    its own slice, cut to its length; the layers of a long row's slice run checkpointed, a short row's do not."""
    budget = 40
    short = [{"messages": [{"role": "user", "content": f"Echo {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in ["red", "green", "blue", "gold"]]
    long = [{"messages": [{"role": "user", "content": f"Echo {w} thirty times"},
                          {"role": "assistant", "content": " ".join([w] * 30)}]} for w in ["red", "green", "blue", "gold"]]
    rows = [row for pair in zip(short, long) for row in pair] * 2
    slices, checkpointed = [], []
    real_slices, real_checkpoint = trainer_module.row_slices, recompute.checkpoint

    def recorded_slices(inputs, max_tokens):
        pieces = real_slices(inputs, max_tokens)
        slices.extend(piece["input_ids"].shape for piece in pieces)
        return pieces

    def recorded_checkpoint(function, hidden, *args, **kwargs):
        checkpointed.append(hidden.shape[:2])
        return real_checkpoint(function, hidden, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "row_slices", recorded_slices)
    monkeypatch.setattr(recompute, "checkpoint", recorded_checkpoint)
    _, result = train_tiny(f"train.micro_batch_tokens={budget}", "train.max_steps=2", "train.eval_every=100", rows=rows)
    assert result.eval_after is not None
    long_slices = [shape for shape in slices if shape.numel() > budget]
    assert long_slices and len(long_slices) < len(slices), slices
    layers = 2
    assert checkpointed == [shape for shape in long_slices for _ in range(layers)]
