"""Contracts of the library internals loraforge uses (src/loraforge/internals/): each fails loudly when an
upgrade changes what loraforge relies on."""

import inspect
from importlib.metadata import version

import pytest
import torch

from loraforge import internals


@pytest.mark.parametrize("package", sorted(internals.CHECKED_AGAINST))
def test_installed_versions_are_the_checked_ones(package):
    checked = internals.CHECKED_AGAINST[package]
    assert version(package).startswith(checked + "."), (
        f"{package} {version(package)} is installed, internals/ was checked against {checked}: re-check each use "
        "of it there, then update CHECKED_AGAINST")


def test_trainer_private_steps_keep_their_signatures():
    from transformers import Trainer

    def params(name):
        return list(inspect.signature(getattr(Trainer, name)).parameters)

    assert params("_get_train_sampler") == ["self", "train_dataset"]
    assert params("_save_checkpoint") == ["self", "model", "trial"]
    assert params("_load_from_checkpoint")[:2] == ["self", "resume_from_checkpoint"]
    assert params("set_initial_training_values") == ["self", "args", "dataloader"]
    assert "`max_steps`" in Trainer.set_initial_training_values.__doc__.strip().splitlines()[-1], "returned last"


def test_the_trainer_state_file_is_named_as_transformers_names_it():
    from transformers.trainer import TRAINER_STATE_NAME

    from loraforge.training.resume import TRAINER_STATE

    assert TRAINER_STATE == TRAINER_STATE_NAME


def test_a_lambda_scheduler_keeps_its_last_rates_where_put_on_schedule_sets_them():
    from torch.optim.lr_scheduler import LambdaLR

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer.param_groups[0]["lr"] = 0.0
    internals.put_on_schedule(optimizer, scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    assert scheduler.get_last_lr() == [pytest.approx(0.1 / 4)], "get_last_lr() reads what put_on_schedule set"


def test_hooks_are_called_by_training(tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments
    from datasets import Dataset

    calls = []

    class Recording(internals.HookedTrainer):
        def train_sampler(self, default):
            calls.append(("sampler", type(default).__name__))
            return default

        def save_checkpoint(self, write):
            calls.append(("save", self.state.global_step))
            write()

    ids = tokenizer("hello there, general")["input_ids"]
    data = Dataset.from_dict({"input_ids": [ids] * 4, "attention_mask": [[1] * len(ids)] * 4, "labels": [ids] * 4})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                             report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer))
    trainer.train()
    assert calls == [("sampler", "RandomSampler"), ("save", 2)]
    saved = tmp_path / "checkpoint-2"
    assert (saved / "trainer_state.json").is_file() and (saved / "optimizer.pt").is_file()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trainer.load_checkpoint_weights(str(saved))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights back from checkpoint-2"


def test_bitsandbytes_still_decides_the_cpu_repack_by_the_attribute():
    import bitsandbytes as bnb

    assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit)


def test_trl_padding_free_collator_restarts_positions_per_sample():
    batch = internals.padding_free_collator(0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]


def test_dpo_private_pieces_keep_their_shape():
    from trl import DPOTrainer

    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    source = inspect.getsource(DPOTrainer)
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in source
    assert 'self._metrics[mode]["rewards/accuracies"]' in source
    assert 'if "prompt" not in first_example' in inspect.getsource(DPOTrainer._prepare_dataset), (
        "TRL still re-tokenizes prepared rows, which HookedDPOTrainer._prepare_dataset passes through")


def test_orpo_private_pieces_keep_their_shape():
    from trl.experimental.orpo import ORPOTrainer

    assert "train_dataset = train_dataset.map(self.tokenize_row" in inspect.getsource(ORPOTrainer.__init__)
    forward = inspect.getsource(ORPOTrainer.concatenated_forward)
    assert "return (chosen_logps, rejected_logps, chosen_logits, rejected_logits, chosen_nll_loss)" in forward
    assert "chosen_logits = all_logits[:len_chosen, :-1, :]" in forward, "logits[i] predicts token i + 1"
    assert "self._stored_metrics = defaultdict(lambda: defaultdict(list))" in inspect.getsource(ORPOTrainer)
    assert 'logs[key] = torch.tensor(metrics).mean().item()' in inspect.getsource(ORPOTrainer.log)


def test_kto_private_pieces_keep_their_shape():
    from trl import KTOTrainer

    assert list(inspect.signature(KTOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    prepare = inspect.getsource(KTOTrainer._prepare_dataset)
    assert 'examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]' in prepare
    assert "batch_size=args.per_device_train_batch_size" in prepare, "the KL pairing HookedKTOTrainer repeats"
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in inspect.getsource(KTOTrainer)


@pytest.mark.parametrize("sharding", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_evaluating_before_training_under_fsdp_or_deepspeed_is_refused_before_any_evaluation(sharding):
    """FSDP and DeepSpeed prepare the model with its optimizer, which evaluate() does not have: HF's evaluation
    then stops in accelerate (FSDP2) or DeepSpeed (ZeRO-2) with their own errors, so the hook refuses first."""
    from types import SimpleNamespace

    from loraforge.errors import ConfigError

    stand_in = SimpleNamespace(args=SimpleNamespace(world_size=2), is_fsdp_enabled=False, is_deepspeed_enabled=False,
                               evaluate=lambda: pytest.fail("evaluated"))
    setattr(stand_in, sharding, True)
    with pytest.raises(ConfigError, match="evaluates before training.*launch it with DDP"):
        internals.TrainerHooks.evaluate_before_training(stand_in)
    stand_in.args.world_size = 1
    setattr(stand_in, "evaluate", lambda: {"eval_loss": 1.0})
    assert internals.TrainerHooks.evaluate_before_training(stand_in) == {"eval_loss": 1.0}


def test_the_legacy_gguf_reader_keeps_its_signature():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    assert list(inspect.signature(load_gguf_checkpoint).parameters) == [
        "gguf_checkpoint_path", "return_tensors", "model_to_load", "torch_dtype"]
