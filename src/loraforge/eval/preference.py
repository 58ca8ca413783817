"""Preference accuracy on held-out pairs: does a model give its chosen answer a higher log-probability than its
rejected one, by itself and relative to the reference it was tuned against?

For each pair, margin = log p(chosen | prompt) - log p(rejected | prompt), summed over the answer tokens.
- preference accuracy: the share of pairs whose tuned margin is above the reference's (the model moved towards
  the chosen answer), ties counted half; the starting model is the reference, so its own is 0.5. Without ties
  this is TRL's rewards/accuracies (beta (log-ratio chosen - log-ratio rejected) > 0).
- chosen more likely: the share of pairs whose margin is above 0, for the tuned and the starting model (an easy
  set starts high, and DPO need not raise it: it moves the margin relative to the reference).
- reward margin: beta times the mean of (tuned margin - reference margin).
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
    n = len(tuned)
    return {
        "pairs": n,
        "preference_accuracy": sum(1.0 if t > s else 0.5 if t == s else 0.0 for t, s in zip(tuned, start)) / n,
        "chosen_more_likely": sum(m > 0 for m in tuned) / n,
        "chosen_more_likely_start": sum(m > 0 for m in start) / n,
        "reward_margin": beta * sum(t - s for t, s in zip(tuned, start)) / n,
    }


def preference_line(found: dict) -> str:
    return (f"preference accuracy {found['preference_accuracy']:.3f} (starting model 0.5), reward margin "
            f"{found['reward_margin']:.3f}; chosen more likely than rejected {found['chosen_more_likely_start']:.3f} "
            f"at the start -> {found['chosen_more_likely']:.3f} ({found['pairs']} pairs)")
