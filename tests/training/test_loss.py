"""The causal loss at trained positions only, row slices of long batches, and the base evaluation at the end."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from loraforge.data.packing import collator
from loraforge.data.render import IGNORE
from loraforge.training.loss import next_token_targets, trained_positions_loss
from loraforge.training.trainer import row_slices
from tests.conftest import save_tiny_llama, write_jsonl


@pytest.fixture
def batch(tokenizer):
    rows = []
    for prompt, answer in [("Say hi", "hi there, how are you today?"), ("Count", "one two"), ("Name a colour", "red")]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                            return_dict=False)
        prompt_len = len(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                       return_dict=False))
        labels = [IGNORE] * prompt_len + ids[prompt_len:]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return collator(tokenizer, packed=False)(rows)


def _model(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_loss_and_gradients_match_the_models_own_loss(tiny_model_dir, batch):
    reference = _model(tiny_model_dir)
    own = reference(**batch).loss
    own.backward()
    model = _model(tiny_model_dir)
    loss, outputs = trained_positions_loss(model, batch)
    loss.backward()
    trained = int((next_token_targets(batch["labels"]) != IGNORE).sum())
    assert outputs.logits.shape == (1, trained, model.config.vocab_size), "logits at trained positions only"
    assert trained < batch["input_ids"].numel() / 2
    assert loss.item() == pytest.approx(own.item(), rel=1e-5)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_turns_the_mean_into_a_share_of_the_step(tiny_model_dir, batch):
    model = _model(tiny_model_dir)
    mean, _ = trained_positions_loss(model, batch)
    trained = int((next_token_targets(batch["labels"]) != IGNORE).sum())
    share, _ = trained_positions_loss(model, batch, num_items_in_batch=torch.tensor(4 * trained))
    assert share.item() == pytest.approx(mean.item() / 4, rel=1e-5)


def test_row_slices_cut_whole_rows_within_the_token_budget(batch):
    rows, length = batch["input_ids"].shape
    assert row_slices(batch, rows * length) == [batch], "a batch within the budget runs whole"
    pieces = row_slices(batch, length)
    assert [p["input_ids"].shape[0] for p in pieces] == [1] * rows
    assert [p["input_ids"].shape[0] for p in row_slices(batch, 1)] == [1] * rows, "at least one row per slice"


def test_row_slices_drop_the_padding_columns_of_each_slice(batch):
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert len(set(lengths)) == len(lengths), "the fixture's rows differ in length"
    for row, piece in enumerate(row_slices(batch, 1)):
        assert bool(piece["attention_mask"].all()), "a one-row slice is cut to its own length"
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(piece[key][0], batch[key][row, : lengths[row]]), key
        assert bool((batch["labels"][row, lengths[row] :] == IGNORE).all()), "only untrained padding is cut"
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    shortest_first = {k: v[order] for k, v in batch.items()}
    together, longest = row_slices(shortest_first, 2 * batch["input_ids"].shape[1])
    assert together["input_ids"].shape == (2, lengths[order[1]]), "a slice is as long as its longest row"
    assert not bool(together["attention_mask"].all()), "a shorter row in it keeps its mask"
    assert longest["input_ids"].shape == (1, lengths[order[2]])


def test_skipping_peft_input_casts_under_autocast_changes_nothing(tiny_model_dir, batch):
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model, active=skip):
            loss, _ = trained_positions_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
        results.append((loss.item(), grads))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_row_slices_train_the_same_adapter(train_tiny):
    """Slices of whole rows give the whole batch's gradient: same loss and gradient norm at every step (a slice
    weighted wrongly changes the norm; Adam alone would hide it), same adapter up to fp32 summation order."""
    runs = [train_tiny(f"train.micro_batch_tokens={limit}", "train.max_steps=3", "train.logging_steps=1", "precision=fp32")
            for limit in ("null", "1")]
    (_, whole), (_, sliced) = runs
    logged = [[json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (whole, sliced)]
    steps = [[(m["step"], m["loss"], m["grad_norm"]) for m in log if "grad_norm" in m] for log in logged]
    assert [s[0] for s in steps[0]] == [1, 2, 3]
    for (step, loss, norm), (_, sliced_loss, sliced_norm) in zip(*steps):
        assert sliced_loss == pytest.approx(loss, rel=1e-5), f"step {step} loss"
        assert sliced_norm == pytest.approx(norm, rel=1e-4), f"step {step} gradient norm"
    a = load_file(whole.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(sliced.run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k), "the adapter trained"
    # Adam divides by each element's own gradient scale, so summation-order noise in a near-zero gradient
    # element shows as ~1e-5 in that weight.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    assert sliced.eval_after == pytest.approx(whole.eval_after, rel=1e-5)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory, tokenizer):
    """A tiny llama whose attention and MLP layers have biases, for lora.bias all and lora_only."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-biased"), tokenizer, seed=1, attention_bias=True,
                           mlp_bias=True)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_before_evaluation_and_base_answers_come_from_the_base_model(train_tiny, tokenizer, biased_model_dir, bias):
    """Whether the base is evaluated after training with the adapter off (bias none) or before training (biases
    trained in place), the step-0 eval loss and the "Base:" answers are those of the untouched base model,
    evaluated and answered on its own."""
    from safetensors.torch import load_file

    from loraforge.data.build import build_datasets
    from loraforge.data.render import stop_token_ids
    from loraforge.eval.generate import generate_batch, prompt_messages
    from loraforge.model.load import load_model
    from loraforge.training.build import training_arguments
    from loraforge.training.trainer import LoraforgeTrainer

    config, result = train_tiny("precision=fp32", f"model.name={biased_model_dir}", f"lora.bias={bias}")
    trained_biases = [k for k in load_file(result.run_dir / "adapter" / "adapter_model.safetensors") if k.endswith(".bias")]
    assert bool(trained_biases) == (bias != "none")
    base = load_model(str(biased_model_dir))
    stop_ids = stop_token_ids(tokenizer, base.generation_config)
    data = build_datasets(config.data, tokenizer, stop_ids, config.seed)
    # no trackers: outside a run, TensorBoard would log into ./runs of the working directory
    untracked = config.model_copy(update={"report_to": []})
    args = training_arguments(untracked, result.run_dir / "base-eval", "fp32", has_eval=True)
    trainer = LoraforgeTrainer(model=base, args=args, eval_dataset=data.val, causal_lm=True,
                               data_collator=collator(tokenizer, packed=False), processing_class=tokenizer)
    assert result.eval_before == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)
    assert result.eval_after < result.eval_before
    chats = [prompt_messages(p, None) for p in config.eval.sample_prompts]
    assert [s["base"] for s in result.samples] == generate_batch(base, tokenizer, chats, config.eval.max_new_tokens, stop_ids)


def test_eval_loss_is_the_mean_over_trained_tokens_whatever_the_batch_size(tiny_model_dir, tokenizer, tmp_path, chat_rows):
    from transformers import TrainingArguments

    from loraforge.config import RunConfig
    from loraforge.data.build import build_datasets
    from loraforge.data.render import stop_token_ids
    from loraforge.training.trainer import LoraforgeTrainer

    model = _model(tiny_model_dir).eval()
    rows = [dict(r, messages=r["messages"][:1] + [{"role": "assistant", "content": "word " * (1 + i % 9)}])
            for i, r in enumerate(chat_rows)]
    config = RunConfig.model_validate({"data": {"sources": [{"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}],
                                                "val_fraction": 0.5}})
    val = build_datasets(config.data, tokenizer, stop_token_ids(tokenizer), config.seed).val
    batch = collator(tokenizer, packed=False)([val[i] for i in range(len(val))])
    targets = next_token_targets(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[targets != IGNORE], targets[targets != IGNORE]).item()
    found = []
    for size in (1, 3, 5):
        args = TrainingArguments(output_dir=str(tmp_path / f"e{size}"), per_device_eval_batch_size=size, report_to="none",
                                 use_cpu=True, remove_unused_columns=False)
        trainer = LoraforgeTrainer(model=model, args=args, eval_dataset=val, causal_lm=True,
                                   data_collator=collator(tokenizer, packed=False))
        found.append(trainer.evaluate()["eval_loss"])
    assert found == pytest.approx([expected] * 3, rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_head_loss_matches_the_models_own_loss_and_keeps_no_logits(tiny_model_dir, batch, monkeypatch,
                                                                          precision):
    """In training the chunked loss stands in for a frozen head: the model's own loss and LoRA gradients (fp32, and
    a bf16 model whose forward runs under autocast) while autograd keeps no tensor of the vocabulary's width; chunks of 7 positions make
    several."""
    from accelerate.utils import convert_outputs_to_fp32
    from peft import LoraConfig, get_peft_model

    from loraforge.training import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK", 7)
    trained = int((next_token_targets(batch["labels"]) != IGNORE).sum())
    assert trained > 2 * loss_module.CHUNK
    results = []
    for chunked in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32 if precision == "fp32"
                                                    else torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                                init_lora_weights=False))
        model.train()
        if precision == "bf16":
            # As accelerate runs a bf16 model: its forward under autocast, its outputs cast to fp32, the loss outside.
            model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
        widths = set()

        def keep(tensor):
            widths.add(tensor.shape[-1] if tensor.dim() else 0)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            if chunked:
                assert loss_module.chunkable_head(model) is model.get_output_embeddings()
                loss, _ = trained_positions_loss(model, batch, num_items_in_batch=torch.tensor(3 * trained))
            else:
                loss = model(**batch).loss / 3
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad},
                        model.config.vocab_size in widths))
    (own_loss, own_grads, own_kept_logits), (loss, grads, kept_logits) = results
    assert own_kept_logits and not kept_logits
    assert loss == pytest.approx(own_loss, rel=1e-6 if precision == "fp32" else 1e-2)
    for name, grad in own_grads.items():
        if precision == "fp32":
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=1e-3, msg=name)


class NewTensors(TorchDispatchMode):
    """(op, shape) of every tensor an op inside it returns in new memory (not an input's, not a view of one)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in given:
                self.made.append((func.__name__, tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_of_the_head_loss_builds_one_tensor_of_the_vocabularys_width_in_fp32(dtype):
    """Its logits (in bf16 also their fp32 copy, and the softmax cast back for the product), turned into the softmax
    in place: log_softmax beside them would hold a second fp32 one, 12.6 MB for 64 positions of a 49,152 vocabulary."""
    from loraforge.training.loss import CHUNK, ChunkedHeadLoss

    torch.manual_seed(0)
    vocabulary = 1000
    hidden = torch.randn(CHUNK, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocabulary, 32, dtype=dtype) * 0.1
    targets = torch.randint(0, vocabulary, (CHUNK,))
    with NewTensors() as recorded:
        loss = ChunkedHeadLoss.apply(hidden, weight, targets)
    wide = [op for op, shape in recorded.made if shape and shape[-1] == vocabulary]
    copies = [] if dtype == torch.float32 else ["_to_copy.default", "_to_copy.default"]
    assert wide == ["mm.default", *copies], wide
    expected = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().T, targets, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5 if dtype == torch.float32 else 2e-2)


def test_the_head_is_not_chunked_where_it_trains_or_outside_training(tiny_model_dir):
    model = _model(tiny_model_dir)
    from loraforge.training.loss import chunkable_head

    assert chunkable_head(model) is None, "a model in eval mode"
    model.train()
    assert chunkable_head(model) is None, "a head that trains (every weight of a freshly loaded model does)"
    model.requires_grad_(False)
    assert chunkable_head(model) is model.get_output_embeddings()
    with torch.no_grad():
        assert chunkable_head(model) is None, "without gradients"
