"""Fail-fast checks on tokenized training data: each catches a bug that would otherwise train silently."""

from loraforge.data.packing import collator
from loraforge.data.render import IGNORE
from loraforge.errors import DataError

SAMPLES_THROUGH_COLLATOR = 16


def check_trainable(dataset, wheres: list[str], tokenizer, stop_ids, data_config) -> None:
    _check_double_bos(dataset, wheres, tokenizer)
    chat = [fmt for fmt in (s.format.value for s in data_config.sources) if fmt != "text"]
    if chat and data_config.masking.value != "all":
        _check_end_of_turn_trained(dataset, tokenizer, stop_ids)
    _check_collator_keeps_labels(dataset, tokenizer, stop_ids)


def _check_double_bos(dataset, wheres, tokenizer) -> None:
    bos = tokenizer.bos_token_id
    if bos is None:
        return
    for index, ids in enumerate(dataset["input_ids"]):
        if len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            raise DataError(
                f"{wheres[index]}: the sample starts with BOS twice ({tokenizer.bos_token!r}): the text or template "
                "already holds BOS and the tokenizer added another; remove it from the data or data.chat_template"
            )


def _check_end_of_turn_trained(dataset, tokenizer, stop_ids) -> None:
    if not stop_ids:
        raise DataError(
            "the tokenizer has no EOS token, so no end of turn can be trained and the model would never stop; "
            "use a model whose tokenizer sets eos_token"
        )
    if not any(any(label in stop_ids for label in labels) for labels in dataset["labels"]):
        names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(stop_ids))
        raise DataError(
            f"no training sample trains an end-of-turn token ({names}), so the model would never learn to stop: "
            "the chat template does not end assistant turns with EOS; set data.chat_template to one that does"
        )


def _check_collator_keeps_labels(dataset, tokenizer, stop_ids) -> None:
    features = [dataset[i] for i in range(min(SAMPLES_THROUGH_COLLATOR, len(dataset)))]
    batch = collator(tokenizer, packed=False)(features)
    for row, feature in enumerate(features):
        expected = sum(1 for label in feature["labels"] if label != IGNORE)
        kept = int((batch["labels"][row] != IGNORE).sum())
        if kept != expected:
            raise DataError(
                f"batching masked {expected - kept} trained tokens of a sample (pad id {tokenizer.pad_token_id} "
                f"{'equals EOS' if tokenizer.pad_token_id in stop_ids else ''}); labels must be masked by position"
            )
