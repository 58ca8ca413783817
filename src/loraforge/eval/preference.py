"""Held-out preference: does a model favour the preferred answers, by itself and relative to the reference it was
tuned against?

Pairs: for each, margin = log p(chosen | prompt) - log p(rejected | prompt), summed over the answer tokens.
- preference accuracy: the share of pairs whose tuned margin is above the reference's (the model moved towards
  the chosen answer), ties counted half; the starting model is the reference, so its own is 0.5. Without ties
  this is TRL's rewards/accuracies (beta (log-ratio chosen - log-ratio rejected) > 0).
- chosen more likely: the share of pairs whose margin is above 0, for the tuned and the starting model (an easy
  set starts high, and DPO need not raise it: it moves the margin relative to the reference).
- reward margin: beta times the mean of (tuned margin - reference margin).

Unpaired rows (a prompt, one answer and its label): log-ratio = log p(answer | prompt) under the tuned model
minus under the reference.
- label accuracy: the share of rows whose log-ratio went the way the label asks, up for a desirable answer and
  down for an undesirable one, ties counted half; the starting model's is 0.5.
- desirable / undesirable reward: beta times the mean log-ratio of each kind (TRL's KTO rewards/chosen and
  rewards/rejected, over the whole split).
"""

from loraforge import rundir
from loraforge.errors import DataError


def answer_logps(model, prompts: list[list[int]], answers: list[list[int]], pad_token_id: int,
                 batch_size: int = 8) -> list[float]:
    """Per prompt and answer (token ids), the summed log-probability of the answer after the prompt. Rows are
    right-padded into batches on the model's device; log-probabilities are taken one sequence at a time (a
    full-vocabulary copy per batch would be gigabytes for a large vocabulary)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    found: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = list(zip(prompts[start : start + batch_size], answers[start : start + batch_size]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for row, (prompt, answer) in enumerate(rows):
            end = len(prompt) + len(answer)
            ids[row, :end] = torch.tensor(prompt + answer)
            attention[row, :end] = 1
            scored[row, len(prompt) : end] = True
        ids, scored = ids.to(device), scored[:, 1:].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention.to(device)).logits
            for row in range(len(rows)):
                shifted = logits[row, :-1].float()
                logp = shifted.gather(-1, ids[row, 1:, None]).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
                found.append((logp * scored[row]).sum().item())
    model.train(was_training)
    return found


def pair_margins(model, dataset, pad_token_id: int, batch_size: int = 4) -> list[float]:
    """Per pair, the summed log-probability of the chosen answer minus that of the rejected one."""
    prompts = list(dataset["prompt_ids"])
    logps = answer_logps(model, prompts + prompts, list(dataset["chosen_ids"]) + list(dataset["rejected_ids"]),
                         pad_token_id, 2 * batch_size)
    return [chosen - rejected for chosen, rejected in zip(logps[: len(prompts)], logps[len(prompts) :])]


def reference(model):
    """The reference the model was tuned against, as TRL's DPO computes it: the `ref` adapter (its copy of the
    starting adapter) when the model has one, else the base with every adapter off."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, rundir.REFERENCE if rundir.REFERENCE in getattr(model, "peft_config", {}) else None)


def preference_metrics(model, dataset, pad_token_id: int, beta: float, batch_size: int = 4) -> dict:
    """Pairs: preference accuracy of the tuned and the reference (starting) model, reward margin; unpaired rows
    (a `label` column): label accuracy and the rewards of desirable and undesirable answers."""
    if dataset is None or len(dataset) == 0:
        raise DataError("no preference rows to evaluate (every row was dropped, or the split is empty); check "
                        "data.max_length and the data")
    if "label" in dataset.column_names:
        return _unpaired_metrics(model, dataset, pad_token_id, beta, batch_size)
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


def _unpaired_metrics(model, dataset, pad_token_id: int, beta: float, batch_size: int) -> dict:
    prompts, answers = list(dataset["prompt_ids"]), list(dataset["completion_ids"])
    tuned = answer_logps(model, prompts, answers, pad_token_id, batch_size)
    with reference(model):
        start = answer_logps(model, prompts, answers, pad_token_id, batch_size)
    ratios = [t - s for t, s in zip(tuned, start)]
    labels = list(dataset["label"])
    right = [0.5 if r == 0 else float((r > 0) == desirable) for r, desirable in zip(ratios, labels)]

    def reward(desirable: bool) -> float | None:
        own = [r for r, label in zip(ratios, labels) if label == desirable]
        return beta * sum(own) / len(own) if own else None

    return {
        "rows": len(ratios),
        "desirable": sum(labels),
        "label_accuracy": sum(right) / len(right),
        "desirable_reward": reward(True),
        "undesirable_reward": reward(False),
    }


def held_out_kind(found: dict) -> str:
    return "pairs" if "pairs" in found else "rows"


def preference_line(found: dict) -> str:
    if "pairs" not in found:
        rewards = ", ".join(f"{kind} answers {found[f'{kind}_reward']:+.3f}" for kind in ("desirable", "undesirable")
                            if found[f"{kind}_reward"] is not None)
        return (f"label accuracy {found['label_accuracy']:.3f} (starting model 0.5), reward of {rewards} "
                f"({found['rows']} rows, {found['desirable']} desirable)")
    return (f"preference accuracy {found['preference_accuracy']:.3f} (starting model 0.5), reward margin "
            f"{found['reward_margin']:.3f}; chosen more likely than rejected {found['chosen_more_likely_start']:.3f} "
            f"at the start -> {found['chosen_more_likely']:.3f} ({found['pairs']} pairs)")
