"""The run config. Each field's description is its only documentation."""

import json
import string
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from loraforge.config.data_section import DataConfig, Label, label_text
from loraforge.config.section import Section


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Built-in model name (smollm2-135m-instruct, works offline), a local folder (a relative one "
        "from the current directory, and for chat, eval, merge, export and serve from the one the run trained in), "
        "or a Hugging Face hub id passed unchanged to from_pretrained.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model.name.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint; off unless you trust its source (logged when on)."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; sdpa is the fastest that works on CPU."
    )
    variant: Literal["original", "drop_layers", "keep_layers"] = Field(
        "original",
        description="original: the model as published; drop_layers: remove the decoder layers listed in "
        "drop_layers; keep_layers: keep only the first keep_layers decoder layers.",
    )
    drop_layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description="Decoder layer indices removed by variant: drop_layers.")
    keep_layers: int | None = Field(None, ge=1, description="Number of leading decoder layers kept by variant: keep_layers.")

    @model_validator(mode="after")
    def _variant_settings(self):
        if self.variant == "drop_layers" and not self.drop_layers:
            raise ValueError("variant drop_layers needs model.drop_layers, e.g. [16]")
        if self.variant == "keep_layers" and self.keep_layers is None:
            raise ValueError("variant keep_layers needs model.keep_layers, e.g. 24")
        if self.variant != "drop_layers" and self.drop_layers:
            raise ValueError("model.drop_layers is set but model.variant is not drop_layers")
        if self.variant != "keep_layers" and self.keep_layers is not None:
            raise ValueError("model.keep_layers is set but model.variant is not keep_layers")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(
        0.0, ge=0, lt=1, description="Dropout on the LoRA input (peft's default 0). Above 0 it keeps a dropped copy of "
        "every adapted layer's input for backward: +1 GB peak RSS on the demo at batch 4 on CPU."
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to wrap with LoRA, or 'all-linear' for every linear layer but the output head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude per output as well as the low-rank direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [lm_head], or [score] for classification)."
    )

    @model_validator(mode="after")
    def _targets_not_empty(self):
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is empty; list module names such as [q_proj, v_proj] or use all-linear")
        return self


class EarlyStopping(Section):
    patience: int | None = Field(None, ge=1, description="Evaluations without improvement before stopping; null never stops.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change of best_metric that counts as an improvement.")


# Keys of train that say one thing two ways: a config layer (a file over the one it extends, overrides over
# the file) that sets one of a pair replaces the other; set together in one layer they are an error.
ONE_OF = (("max_steps", "num_epochs"), ("warmup_ratio", "warmup_steps"))


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (100 when neither it nor "
                                  "num_epochs is given); set one of the two.")
    num_epochs: float | None = Field(None, gt=0, description="Passes over the training data, instead of max_steps.")
    batch_size: int = Field(
        4, ge=1, description="Samples per forward pass (per device). 4 x grad_accum 2 measured faster than 8 x 1 "
        "on a 2-core CPU with 44% less peak memory (bench/compare.py)."
    )
    grad_accum: int = Field(2, ge=1, description="Forward passes accumulated per optimizer step.")
    global_batch: int | None = Field(
        None, ge=1, description="Examples per optimizer step across every process; sets the accumulation to "
        "global_batch / (batch_size x processes) in place of grad_accum, so the run keeps its batch when the "
        "process count changes."
    )
    micro_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="Most padded tokens in one forward and backward pass: a batch of long samples beyond it "
        "runs as slices of whole rows, with the same gradient, and a single row longer than it recomputes its layers' "
        "activations in backward. Bounds peak memory on CPU (make bench compares "
        "256, 512 and no limit side by side). auto: 256 on CPU, no limit on a GPU; null: every batch whole."
    )
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning rate schedule after warmup."
    )
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Share of steps spent warming the learning "
                                       "rate up (0.03 when neither it nor warmup_steps is given).")
    warmup_steps: int | None = Field(None, ge=0, description="Steps spent warming the learning rate up, instead of "
                                     "warmup_ratio.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, allow_inf_nan=True, description="Gradient clipping norm (.inf: no "
                                 "clipping).")
    eval_every: Annotated[int, Field(ge=1)] | Literal["epoch"] = Field(
        50, description="Evaluate on the validation split every this many steps, or at the end of every epoch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Samples per evaluation forward pass; null: batch_size.")
    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and tokens/s every this many steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch", description="Optimizer; the 8-bit and paged ones (bitsandbytes) need a CUDA GPU."
    )
    save_every: Annotated[int, Field(ge=1)] | Literal["epoch"] | None = Field(
        50, description="Write a checkpoint (adapter, optimizer, scheduler, RNG, data position) every this "
        "many steps or at the end of every epoch; null writes none (a stop by signal still writes one)."
    )
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept besides the best one.")
    best_metric: str = Field(
        "eval_loss", description="Evaluation metric that picks the best checkpoint (lower is better for losses, "
        "higher for the rest), e.g. eval_loss, eval_accuracy."
    )
    load_best_at_end: bool = Field(
        True, description="When the run evaluates, end with the weights of the checkpoint best by best_metric (the "
        "summary and report say which step); false keeps the last step's. Only evaluations that fall on a "
        "checkpoint can be chosen, so save_every should be a multiple of eval_every (the defaults are)."
    )
    nan_patience: int = Field(
        1, ge=1, description="Stop after this many optimizer steps in a row with a NaN or inf loss; "
        "no checkpoint is written from a poisoned step."
    )
    early_stopping: "EarlyStopping" = Field(
        default_factory=lambda: EarlyStopping(), description="Stop when best_metric stops improving."
    )
    group_by_length: bool = Field(
        True,
        description="Batch samples of similar length together so less padding is computed "
        "(1.7x the real tokens/s of random batches at batch 8 on a 2-core CPU); the batch order stays seeded.",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_pairs(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for (first, second), default in zip(ONE_OF, (100, 0.03)):
                if first not in data and second not in data:
                    data[first] = default
        return data

    @model_validator(mode="after")
    def _one_of_each_pair(self):
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("set train.max_steps or train.num_epochs")
        if self.warmup_ratio is None and self.warmup_steps is None:
            raise ValueError("set train.warmup_ratio or train.warmup_steps (0 for no warmup)")
        for first, second in ONE_OF:
            a, b = getattr(self, first), getattr(self, second)
            if a is not None and b is not None:
                raise ValueError(f"train.{first} ({a:g}) and train.{second} ({b:g}) are both set; drop one of them "
                                 "(or set it to null): they say the same thing two ways")
        return self


class EvalConfig(Section):
    sample_prompts: list[str] = Field(
        default_factory=list,
        description="Prompts answered by the base and the fine-tuned model at the end of training (report.md); "
        "empty uses the first num_samples validation prompts.",
    )
    num_samples: int = Field(3, ge=0, description="Validation prompts answered when sample_prompts is empty.")
    samples_during_training: int = Field(
        2, ge=0, description="Prompts answered at each evaluation during training, logged to metrics.jsonl and "
        "TensorBoard; 0 turns it off."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer in tokens.")
    test_generations: int = Field(
        32, ge=0, description="Test rows answered at the end of training for the generation metrics (exact match, "
        "contains, ROUGE-L, valid JSON) beside loss, perplexity and token accuracy over every test row."
    )


class QuantizationConfig(Section):
    mode: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the frozen base in 4 or 8 bits through bitsandbytes (QLoRA); `quantization: 4bit` is short for this."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (mode 4bit only).")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (saves about 0.4 bits per weight; mode 4bit only).")
    compute_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dtype the 4-bit matmuls run in; auto follows precision (mode 4bit only)."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value):
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _four_bit_settings_with_four_bits(self):
        # A value at its default is let through: resolved.yaml of an 8-bit run lists the defaults.
        if self.mode == "8bit":
            changed = [f"{name} {json.dumps(getattr(self, name))}" for name in ("quant_type", "double_quant", "compute_dtype")
                       if getattr(self, name) != type(self).model_fields[name].default]
            if changed:
                raise ValueError(f"{' and '.join(changed)}: 4-bit settings, which bitsandbytes' 8-bit loading does "
                                 "not have (they would do nothing with mode 8bit); remove them, or use mode 4bit")
        return self


class ClassificationConfig(Section):
    labels: list[Label] | None = Field(
        None, description="Label names in id order (whole numbers are read as their text, as in the data); null "
        "collects them from the training data, sorted."
    )
    class_weights: Literal["none", "auto"] | dict[Label, Annotated[float, Field(gt=0)]] = Field(
        "none", description="Loss weight per class: none, auto (balanced: n / (classes x count)), or {label: weight}."
    )

    @field_validator("class_weights", mode="before")
    @classmethod
    def _one_of_the_forms(cls, value):
        """One message for what fits neither form, rather than one per form."""
        if not isinstance(value, dict):
            if value in ("none", "auto"):
                return value
            raise ValueError("give none, auto (balanced) or a weight per label such as {positive: 1.0, negative: 3.0}")
        keys = {key: label_text(key) for key in value}
        not_labels = [key for key, label in keys.items() if not isinstance(label, str)]
        if not_labels:
            raise ValueError(f"labels are text or whole numbers, got {not_labels}")
        first: dict = {}
        for key, label in keys.items():
            if label in first:
                raise ValueError(f"{first[label]!r} and {key!r} are one label, {label!r} (a whole number is read as "
                                 "its text, as in the data); keep one of them")
            first[label] = key
        bad = {keys[key]: weight for key, weight in value.items()
               if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0}
        if bad:
            raise ValueError(f"a weight is a number above 0, got {bad}")
        return {keys[key]: weight for key, weight in value.items()}


class WandbTracking(Section):
    project: str | None = Field(None, description="Weights & Biases project (WANDB_PROJECT).")
    entity: str | None = Field(None, description="Weights & Biases team or user (WANDB_ENTITY).")
    run_name: str | None = Field(None, description="Name of the run in Weights & Biases.")


class MlflowTracking(Section):
    experiment: str | None = Field(None, description="MLflow experiment the run is logged under (MLFLOW_EXPERIMENT_NAME).")
    run_name: str | None = Field(None, description="Name of the run in MLflow.")


class TrackingConfig(Section):
    wandb: WandbTracking = Field(default_factory=WandbTracking, description="Names for report_to: [wandb].")
    mlflow: MlflowTracking = Field(default_factory=MlflowTracking, description="Names for report_to: [mlflow].")

    @model_validator(mode="after")
    def _one_run_name(self):
        names = {n for n in (self.wandb.run_name, self.mlflow.run_name) if n is not None}
        if len(names) > 1:
            raise ValueError(f"wandb.run_name and mlflow.run_name differ ({sorted(names)}); the trainer names a run "
                             "once: give them the same name or set one")
        return self

    def run_name(self) -> str | None:
        return self.wandb.run_name or self.mlflow.run_name

    def environment(self) -> dict[str, str]:
        """The variables the trackers read their names from."""
        found = {"WANDB_PROJECT": self.wandb.project, "WANDB_ENTITY": self.wandb.entity,
                 "MLFLOW_EXPERIMENT_NAME": self.mlflow.experiment}
        return {name: value for name, value in found.items() if value is not None}


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Level of train.log and the console.")


# What an evaluation reports for each task, so train.best_metric can be checked before any work.
EVAL_METRICS = {"causal_lm": ("eval_loss",), "classification": ("eval_loss", "eval_accuracy", "eval_macro_f1"),
                "dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
                "orpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss"),
                "kto": ("eval_loss", "eval_rewards/margins")}


class PreferenceConfig(Section):
    beta: float = Field(0.1, gt=0, description="TRL's beta. dpo and kto: how far the tuned model may move from "
                        "the reference, higher keeps it closer; orpo: the weight of the odds-ratio term beside the chosen "
                        "answer's loss (the ORPO paper's lambda).")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="method dpo: sigmoid is the DPO paper's loss; hinge (SLiC) and ipo are TRL's variants."
    )


OUTPUT_DIR_FIELDS = ("model", "data", "time")


class RunConfig(Section):
    output_dir: str = Field(
        "runs/{model}-{data}-{time}", description="Run directory that receives everything the run writes. {model} "
        "(the model's name), {data} (the first data file's name) and {time} (when the run starts) are filled in, and "
        "-2, -3, ... added where a run started in the same second holds the name; resuming names the directory itself."
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for the data split, LoRA initialisation and data order.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to fine-tune.")
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm", description="causal_lm: learn to generate; classification: a label per text, "
        "through a classification head on the model (data format classification)."
    )
    method: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft", description="sft: learn the answers in the data; dpo: learn to prefer the chosen answer over the "
        "rejected one (data format preference), against a reference that is the starting model (the base with the "
        "adapter off, or init_from's adapter); orpo: learn the chosen answer and, in the same loss, its odds over "
        "the rejected one, with no reference pass (SFT and preference in one stage, TRL's ORPO); kto: each answer "
        "on its own, a desirable one made more likely and an undesirable one less, against the reference (TRL's KTO, on "
        "format unpaired_preference rows or on pairs unpaired: chosen desirable, rejected undesirable)."
    )
    init_from: str | None = Field(
        None, description="A finished run directory whose adapter this run starts from (an SFT run before dpo, say); "
        "with a preference method that adapter is also the reference preference accuracy is measured against. Same "
        "base model and LoRA settings required."
    )
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="method dpo, orpo and kto settings.")
    adapter: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter, or every weight (full).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Training dtype. auto: bf16 on GPUs that support it, else fp16; on CPU it times a short "
        "matmul of the model's shapes in fp32 and bf16 at start-up and takes bf16 only where it runs at least 1.3x "
        "fp32 (CPUs that compute bf16 natively: ~2x; elsewhere bf16 is emulated, 2-5x slower). The choice and its "
        "reason are logged and kept in manifest.json. An explicit bf16 that is slower here runs with a warning. "
        "fp16 is refused on CPU."
    )
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="bitsandbytes quantization of the frozen base (QLoRA)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    classification: ClassificationConfig = Field(
        default_factory=ClassificationConfig, description="Labels and class weights for task: classification."
    )
    data: DataConfig = Field(description="Training data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation settings.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and sample generations.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers that receive the metrics; tensorboard writes event files into the run directory. "
        "wandb and mlflow need their package installed and their own settings (WANDB_MODE=offline, MLFLOW_TRACKING_URI), "
        "which a .env file beside the config can hold.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Project, experiment and run names "
                                     "for wandb and mlflow.")

    @field_validator("output_dir")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        try:
            parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                      if name is not None]
        except ValueError as exc:
            raise ValueError(f"{exc} in {value!r}; write {{{{ or }}}} for a literal brace") from None
        if any(spec or conversion for _, spec, conversion in parsed):
            raise ValueError(f"{value!r}: write the fields plain ({{time}}, not {{time:...}}); {{time}} is "
                             "YYYYMMDD-HHMMSS")
        fields = {name for name, _, _ in parsed}
        unknown = sorted(fields - set(OUTPUT_DIR_FIELDS))
        if unknown:
            raise ValueError(f"unknown {{{unknown[0]}}}; output_dir can use {{model}}, {{data}} and {{time}}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.adapter == "full" and self.quantization.mode != "none":
            raise ValueError("adapter full cannot train quantized weights; set quantization: none or adapter: lora")
        formats = {s.format.value for s in self.data.sources}
        if self.task == "classification" and formats != {"classification"}:
            raise ValueError(f"task classification needs every data source in format classification, got {sorted(formats)}")
        if self.task == "classification" and self.data.packing:
            raise ValueError("data.packing does not apply to task classification; set it to false")
        preference = self.data.is_preference()
        if self.method == "sft" and preference:
            raise ValueError("the data is preference data, which method sft does not train; set method: "
                             + ("kto" if self.data.is_unpaired() else "dpo, orpo or kto"))
        if self.method != "sft":
            if not preference:
                raise ValueError(f"method {self.method} needs data in format preference ({{prompt, chosen, rejected}})"
                                 + (" or unpaired_preference ({prompt, completion, label})" if self.method == "kto" else "")
                                 + f"; the sources are {sorted(formats)}")
            if self.method != "kto" and self.data.is_unpaired():
                raise ValueError(f"method {self.method} trains on pairs (format preference), and unpaired_preference rows "
                                 "have one answer each; set method: kto, or pair the answers")
            if self.task != "causal_lm":
                raise ValueError(f"method {self.method} trains a causal_lm; set task: causal_lm")
            if self.adapter != "lora":
                raise ValueError(f"method {self.method} needs adapter: lora, so the reference is the starting model "
                                 "with the adapter off instead of a second copy of every weight")
            if self.lora.bias != "none":
                raise ValueError(f"lora.bias {self.lora.bias} trains biases of the base, which the reference shares, "
                                 f"so the reference would move during method {self.method}; set lora.bias: none")
            if self.method in ("dpo", "kto") and self.lora.dropout:
                raise ValueError(f"lora.dropout {self.lora.dropout:g}: method {self.method} runs without dropout (its "
                                 "reference pass must give the same numbers every time); set lora.dropout: 0")
        if self.method == "kto" and self.train.batch_size < 2:
            raise ValueError("method kto estimates its KL term from the other rows of a batch, so train.batch_size "
                             "must be at least 2; raise it (and lower train.grad_accum to keep the global batch)")
        if self.method != "dpo" and self.preference.loss_type != "sigmoid":
            raise ValueError(f"preference.loss_type chooses among DPO's losses; method {self.method} has none to "
                             "choose, so remove it")
        if self.init_from is not None and self.adapter != "lora":
            raise ValueError("init_from starts from a run's LoRA adapter; set adapter: lora")
        kind = self.method if self.method != "sft" else self.task
        reported = EVAL_METRICS[kind]
        if f"eval_{self.train.best_metric.removeprefix('eval_')}" not in reported:
            raise ValueError(f"train.best_metric: {self.train.best_metric!r} is not a metric a {kind} run reports; "
                             f"use one of {', '.join(reported)}")
        return self
