"""TRL's preference trainers (DPO, KTO, ORPO) fed rows loraforge tokenized itself, and their private parts: the
uses of TRL's internals that only preference runs need (the rest: loraforge/internals/__init__.py)."""

import torch
from trl import DPOTrainer, KTOTrainer
from trl.experimental.orpo import ORPOTrainer

from loraforge.internals import IGNORE, TrainerHooks


class TrlMetrics:
    """TRL's DPOTrainer and KTOTrainer (1.16) keep a step's metrics in their private `_metrics[mode]` until the
    next `log`."""

    def drain_eval_metrics(self) -> dict:
        """The metrics (rewards, log-probabilities) of an evaluation_loop, averaged over batches, and cleared."""
        pending = self._metrics["eval"]
        found = {f"eval_{key}": sum(values) / len(values) for key, values in pending.items() if values}
        pending.clear()
        return found


def _require_columns(dataset, columns: set[str], dataset_name: str) -> None:
    missing = columns - set(dataset.column_names)
    if missing:
        raise ValueError(f"the {dataset_name} rows lack {sorted(missing)}; loraforge tokenizes preference data itself")


class HookedDPOTrainer(TrlMetrics, TrainerHooks, DPOTrainer):
    """TRL's DPOTrainer (1.16) fed rows loraforge tokenized itself (prompt_ids, chosen_ids, rejected_ids):
    its private `_prepare_dataset` would look for text columns and tokenize again, so it passes them through."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_columns(dataset, {"prompt_ids", "chosen_ids", "rejected_ids"}, dataset_name)
        return dataset


class HookedKTOTrainer(TrlMetrics, TrainerHooks, KTOTrainer):
    """TRL's KTOTrainer (1.16) fed rows loraforge tokenized itself (prompt_ids, completion_ids, label). Its
    private `_prepare_dataset` tokenizes text columns and then, for the KL term, gives each prompt the completion
    of the row before it (the first row the last one's) within each batch of per_device_train_batch_size rows (TRL samples sequentially for that);
    here it only does the pairing, as TRL does it."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        _require_columns(dataset, {"prompt_ids", "completion_ids", "label"}, dataset_name)
        if not self.calculate_KL:
            return dataset

        def add_kl_completion_ids(rows):
            rows["KL_completion_ids"] = [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]
            return rows

        return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)


class HookedORPOTrainer(TrainerHooks, ORPOTrainer):
    """TRL's ORPOTrainer (trl.experimental, 1.16) fed rows loraforge tokenized itself, with its loss on the
    chosen answer's tokens only.

    - ORPO maps every row through `tokenize_row`, which tokenizes text columns; here it builds the columns ORPO's
      collator reads (chosen_/rejected_ input_ids, attention_mask, labels; prompt_input_ids, prompt_attention_mask)
      from prompt_ids, chosen_ids and rejected_ids.
    - `concatenated_forward` returns the NLL of the chosen sequence over every token, prompt included; it is
      recomputed from the chosen logits it returns over the answer's tokens only (the chosen labels), as SFT's is.
    - The step's metrics wait in the private `_stored_metrics` until the next `log`.
    """

    def tokenize_row(self, feature, model=None) -> dict:
        prompt, found = feature["prompt_ids"], {"prompt_input_ids": feature["prompt_ids"],
                                                "prompt_attention_mask": [1] * len(feature["prompt_ids"])}
        for side in ("chosen", "rejected"):
            answer = feature[f"{side}_ids"]
            found[f"{side}_input_ids"] = prompt + answer
            found[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            found[f"{side}_labels"] = [IGNORE] * len(prompt) + answer
        return found

    def concatenated_forward(self, model, batch):
        outputs = super().concatenated_forward(model, batch)
        chosen_logits, labels = outputs[2], batch["chosen_labels"][:, 1:]
        labels = torch.nn.functional.pad(labels, (0, chosen_logits.shape[1] - labels.shape[1]), value=IGNORE)
        answer_nll = torch.nn.functional.cross_entropy(chosen_logits.flatten(0, 1).float(),
                                                       labels.flatten().to(chosen_logits.device),
                                                       ignore_index=IGNORE)
        return (*outputs[:4], answer_nll, *outputs[5:])

    def drain_eval_metrics(self) -> dict:
        pending = self._stored_metrics.pop("eval", {})
        return {key: sum(values) / len(values) for key, values in pending.items() if values}
