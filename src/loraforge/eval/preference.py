"""Preference accuracy on held-out pairs: does a model give its chosen answer a higher log-probability than its
rejected one, by itself and relative to the reference it was tuned against?

For each pair, margin = log p(chosen | prompt) - log p(rejected | prompt), summed over the answer tokens.
- preference accuracy: the share of pairs whose margin is above 0 (reported for the tuned and the starting model);
- reward accuracy: the share whose tuned margin is above the reference's, which is TRL's rewards/accuracies
  (beta (log-ratio chosen - log-ratio rejected) > 0); reward margin: beta times the mean difference.
"""

from loraforge import rundir
from loraforge.errors import DataError


def pair_margins(model, dataset, pad_token_id: int, batch_size: int = 4) -> list[float]:
    """Per pair, the summed log-probability of the chosen answer minus that of the rejected one; the batch goes to
    the model's device, and log-probabilities are taken one sequence at a time (a full-vocabulary copy per batch
    would be gigabytes for a large vocabulary)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in rows])
        device = next(model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["completion_mask"][:, 1:].to(device).bool()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
            summed = []
            for row in range(ids.shape[0]):
                shifted = logits[row, :-1].float()
                chosen_logp = shifted.gather(-1, ids[row, 1:, None]).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
                summed.append((chosen_logp * mask[row]).sum())
        chosen, rejected = torch.stack(summed).chunk(2)
        margins.extend((chosen - rejected).tolist())
    model.train(was_training)
    return margins


def reference(model):
    """The reference the model was tuned against, as TRL's DPO computes it: the `ref` adapter (its copy of the
    starting adapter) when the model has one, else the base with every adapter off."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, rundir.REFERENCE if rundir.REFERENCE in getattr(model, "peft_config", {}) else None)


def preference_metrics(model, dataset, pad_token_id: int, beta: float, batch_size: int = 4) -> dict:
    """Preference accuracy of the tuned and the reference (starting) model, reward accuracy and margin."""
    if dataset is None or len(dataset) == 0:
        raise DataError("no preference pairs to evaluate (every pair was dropped, or the split is empty); check "
                        "data.max_length and the data")
    tuned = pair_margins(model, dataset, pad_token_id, batch_size)
    with reference(model):
        start = pair_margins(model, dataset, pad_token_id, batch_size)
    n = max(len(tuned), 1)
    return {
        "pairs": len(tuned),
        "preference_accuracy": sum(m > 0 for m in tuned) / n,
        "start_preference_accuracy": sum(m > 0 for m in start) / n,
        "reward_accuracy": sum(t > s for t, s in zip(tuned, start)) / n,
        "reward_margin": beta * sum(t - s for t, s in zip(tuned, start)) / n,
    }


def preference_line(found: dict) -> str:
    return (f"preference accuracy {found['start_preference_accuracy']:.3f} (start) -> {found['preference_accuracy']:.3f}, "
            f"reward accuracy {found['reward_accuracy']:.3f}, reward margin {found['reward_margin']:.3f} "
            f"({found['pairs']} pairs)")
