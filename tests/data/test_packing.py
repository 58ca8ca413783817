"""Packing puts several samples in one row; each must still see only itself."""

import pytest
import torch

from loraforge.config.data_section import DataConfig
from loraforge.data.build import build_datasets
from loraforge.data.packing import collator, pack
from loraforge.data.render import IGNORE, stop_token_ids
from loraforge.model.load import load_model
from tests.conftest import write_jsonl


def per_example_losses(logits, labels, starts_and_ends):
    out = []
    for start, end in starts_and_ends:
        shift_logits = logits[start : end - 1]
        shift_labels = labels[start + 1 : end]
        out.append(torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE).item())
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "word " * (3 * i + 1)}, {"role": "assistant", "content": f"answer {i} " * (i + 1)}]}
        for i in range(7)
    ] + [{"text": "plain text trained on every token " * 2}]
    tmp = tmp_path_factory.mktemp("pack")
    chat = write_jsonl(tmp / "chat.jsonl", rows[:-1])
    text = write_jsonl(tmp / "text.jsonl", rows[-1:])
    config = DataConfig.model_validate(
        {"sources": [{"path": str(chat)}, {"path": str(text), "format": "text"}], "val_fraction": 0, "cache": False,
         "max_length": 160}
    )
    return build_datasets(config, tokenizer, stop_token_ids(tokenizer), 0).train


def test_packed_loss_equals_unpacked_loss_per_example(samples, tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir)).eval()
    model.config.use_cache = False
    with torch.no_grad():
        unpacked = {}
        for ids, labels in zip(samples["input_ids"], samples["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            unpacked[tuple(ids)] = per_example_losses(logits, torch.tensor(labels), [(0, len(ids))])[0]

        packed = pack(samples, max_length=160)
        assert len(packed) < len(samples), "several samples share a row"
        compared = 0
        for row in packed:
            batch = collator(tokenizer, packed=True)([row])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
            bounds, start = [], 0
            for length in row["seq_lengths"]:
                bounds.append((start, start + length))
                start += length
            losses = per_example_losses(logits, batch["labels"][0], bounds)
            for (begin, end), loss in zip(bounds, losses):
                expected = unpacked[tuple(row["input_ids"][begin:end])]
                assert loss == pytest.approx(expected, abs=1e-4)
                compared += 1
        assert compared == len(samples)


def test_packed_rows_keep_every_trained_token(samples, tokenizer):
    packed = pack(samples, max_length=160)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in samples["input_ids"])
    assert all(len(r) <= 160 for r in packed["input_ids"])
    trained = lambda rows: sorted(t for labels in rows for t in labels[1:] if t != IGNORE)
    batch_labels = [collator(tokenizer, packed=True)([row])["labels"][0].tolist() for row in packed]
    assert sorted(t for labels in batch_labels for t in labels if t != IGNORE) == trained(samples["labels"])


def test_with_the_cache_on_packed_samples_would_leak(samples, tiny_model_dir, tokenizer):
    """The reason training turns the KV cache off when packing: with it on, samples attend to each other."""
    model = load_model(str(tiny_model_dir)).eval()
    row = max(pack(samples, max_length=160), key=lambda r: len(r["seq_lengths"]))
    batch = collator(tokenizer, packed=True)([row])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        model.config.use_cache = False
        apart = model(**inputs, use_cache=False).logits
        leaked = model(**inputs, use_cache=True).logits
    first = row["seq_lengths"][0]
    assert torch.allclose(apart[0, :first], leaked[0, :first], atol=1e-5), "the first sample sees nothing before it"
    assert not torch.allclose(apart[0, first:], leaked[0, first:], atol=1e-3)
