"""The trainers of preference runs (dpo, orpo, kto): TRL's, with loraforge's run lifecycle. A module of its own so that
SFT runs never import TRL (training/build.py imports it only for these methods)."""

from loraforge.internals.preference import HookedDPOTrainer, HookedKTOTrainer, HookedORPOTrainer
from loraforge.model.adapters import trained_in_fp32
from loraforge.rundir import REFERENCE
from loraforge.training.trainer import RunLifecycle, SeededLengthGroupedSampler, pair_lengths


class PairLifecycle(RunLifecycle):
    """The run lifecycle for TRL's preference trainers on rows loraforge tokenized. group_by_length: batches of
    pairs of similar length (prompt and longer answer), in a seeded order, as SFT batches are grouped."""

    def __init__(self, *args, group_by_length: bool = False, reference_adapter: bool = False, **kwargs):
        """reference_adapter: keep the `ref` adapter (a copy of init_from's adapter) as the reference; otherwise
        the reference is the base with the adapter off, and TRL's copy of a fresh adapter is dropped."""
        self.group_by_length = group_by_length
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if not reference_adapter and REFERENCE in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE)
        # TRL casts a quantized model's adapter to bf16; an SFT run keeps it in fp32, and so does this one.
        trained_in_fp32(model)

    def train_sampler(self, sampler):
        if not self.group_by_length:
            return sampler
        return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                          lengths=pair_lengths(self.train_dataset),
                                          seed=self.args.data_seed or self.args.seed)


class PreferenceTrainer(PairLifecycle, HookedDPOTrainer):
    """Method dpo: TRL's DPOTrainer."""


class UnpairedTrainer(PairLifecycle, HookedKTOTrainer):
    """Method kto: TRL's KTOTrainer on examples loraforge unpaired from its pairs (training/build.py unpaired), in
    the seeded order TRL samples them (sequentially, so each batch's KL term pairs its own rows). A step runs the
    batch and its mismatched KL batch through the model."""

    def padded_tokens_of(self, inputs) -> int:
        return int(inputs["input_ids"].numel()) + (int(inputs["KL_input_ids"].numel()) if "KL_input_ids" in inputs else 0)


class OddsRatioTrainer(PairLifecycle, HookedORPOTrainer):
    """Method orpo: TRL's ORPOTrainer. Its batches hold chosen_ and rejected_ columns and no input_ids, which HF
    counts tokens by, so they are counted here: both sides padded to one length run as one batch."""

    def padded_tokens_of(self, inputs) -> int:
        chosen, rejected = inputs["chosen_input_ids"], inputs["rejected_input_ids"]
        return 2 * chosen.shape[0] * max(chosen.shape[1], rejected.shape[1])

    def training_step(self, model, inputs, num_items_in_batch=None):
        real = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
        self.state.num_input_tokens_seen += int(self.accelerator.gather(real.to(self.args.device)).sum())
        return super().training_step(model, inputs, num_items_in_batch)
