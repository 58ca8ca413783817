import torch

from loraforge.model.adapters import apply_lora, parameter_counts
from loraforge.model.load import load_model


def test_lora_trains_only_the_adapter(tiny_model_dir):
    model = apply_lora(load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0,
                       target_modules=["q_proj", "v_proj"], bias="none")
    trainable, total = parameter_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)), "2 layers x (q: 64->64, v: 64->32), rank 4"
    assert trainable < total

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 1000, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        moved = not torch.equal(before[name], param.detach())
        assert moved == param.requires_grad, f"{name}: moved={moved}, trainable={param.requires_grad}"


def test_all_linear_targets_every_projection(tiny_model_dir):
    model = apply_lora(load_model(str(tiny_model_dir)), r=2, alpha=4, dropout=0.0, target_modules="all-linear", bias="none")
    wrapped = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
