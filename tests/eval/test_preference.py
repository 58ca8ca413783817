"""Held-out preference measures (eval/preference.py) on the tiny llama: summed answer log-probabilities in padded
batches equal those of each row alone, and label accuracy counts the direction each answer moved."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from loraforge.eval.preference import answer_logps, preference_metrics


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


ROWS = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9, 10]), ([11, 12, 13, 14, 15], [16])]


def test_answer_logps_in_padded_batches_equal_each_row_alone(tiny):
    batched = answer_logps(tiny, [p for p, _ in ROWS], [a for _, a in ROWS], pad_token_id=0, batch_size=3)
    for (prompt, answer), found in zip(ROWS, batched):
        with torch.no_grad():
            logits = tiny(input_ids=torch.tensor([prompt + answer])).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(prompt + answer)[1:, None]).squeeze(-1)
        assert found == pytest.approx(logp[len(prompt) - 1 :].sum().item(), abs=1e-4), "the answer's tokens only"


def test_label_accuracy_counts_answers_that_moved_the_way_their_label_asks(tiny, monkeypatch):
    import loraforge.eval.preference as preference

    rows = Dataset.from_dict({"prompt_ids": [p for p, _ in ROWS] + [[1]], "completion_ids": [a for _, a in ROWS] + [[2]],
                              "label": [True, False, True, False]})
    tuned, start = [-1.0, -1.0, -3.0, -2.0], [-2.0, -2.0, -3.0, -1.0]
    calls = iter([tuned, start])
    monkeypatch.setattr(preference, "answer_logps", lambda *args, **kw: next(calls))
    monkeypatch.setattr(preference, "reference", lambda model: torch.no_grad())
    found = preference_metrics(tiny, rows, pad_token_id=0, beta=0.5)
    # log-ratios +1 (desirable: right), +1 (undesirable: wrong), 0 (a tie: half), -1 (undesirable: right)
    assert found == {"rows": 4, "desirable": 2, "label_accuracy": 2.5 / 4, "desirable_reward": 0.5 * (1 + 0) / 2,
                     "undesirable_reward": 0.5 * (1 - 1) / 2}
