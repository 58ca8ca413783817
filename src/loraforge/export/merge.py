"""`loraforge merge`: the adapter folded into its base, saved as a model plain transformers loads."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge import rundir
from loraforge.errors import ExportError, RunDirError
from loraforge.export import ledger
from loraforge.model.load import load_model
from loraforge.model.template import apply_template, with_default_system
from loraforge.trained import load_run

log = logging.getLogger(__name__)

PROBES = ("Hello! Who are you?", "Write one sentence about the sea.")
MERGE_RECORD = "merge.json"


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_logit_diff: float
    num_hidden_layers: int

    def summary(self) -> str:
        return (
            f"Merged model: {self.out_dir} ({self.num_hidden_layers} layers)\n"
            f"Max |logit difference| merged (fp32 weights, saved and reloaded) vs adapter: {self.max_abs_logit_diff:.2e}"
        )


def merged_from(folder: Path) -> Path | None:
    """The run whose merged model folder holds (its merge.json, written last), or None."""
    try:
        return Path(json.loads((Path(folder) / MERGE_RECORD).read_text(encoding="utf-8"))["run_dir"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def probe_inputs(tokenizer, task: str):
    if task == "classification":
        return tokenizer(list(PROBES), padding=True, return_tensors="pt")
    texts = [
        apply_template(tokenizer, [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROBES
    ]
    return tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")


def run_merge(run_dir: str | Path, out: str | Path | None = None) -> MergeResult:
    import torch

    run_dir = Path(run_dir)
    rundir.read_config(run_dir)
    if not (run_dir / rundir.ADAPTER / "adapter_config.json").is_file():
        raise RunDirError(f"{run_dir} holds a full model ({rundir.MODEL}/), not an adapter: it is already merged")
    out_dir = Path(out) if out else run_dir / rundir.MERGED
    source = merged_from(out_dir)
    if source is not None and source != run_dir.resolve():
        raise ExportError(f"--out {out_dir} holds the merged model of another run ({source}); choose another folder "
                          "so that run's exports keep their weights")
    ledger.check(out_dir, None, "--out")
    # A quantized run merges onto the unquantized base: merged weights must be plain floats to be saved and reused.
    run = load_run(run_dir, quantized=False)
    config, model, tokenizer, labels = run.config, run.model, run.tokenizer, run.labels
    inputs = probe_inputs(tokenizer, config.task)
    # The check runs its forward passes in float64 (fp32 -> fp64 -> fp32 is exact), so what it measures is
    # the merged fp32 weights against the adapter, not fp32 summation noise across the layers.
    with torch.no_grad():
        reference = model.double()(**inputs).logits
    model.float()
    merged = model.merge_and_unload()
    ledger.claim(out_dir, None, "--out")
    merged.save_pretrained(out_dir)
    system = config.data.system_prompt if config.task == "causal_lm" else None
    if system is not None and tokenizer.chat_template:
        tokenizer.chat_template = with_default_system(tokenizer.chat_template, system)
    tokenizer.save_pretrained(out_dir)
    if labels is not None:
        (out_dir / rundir.LABELS).write_text(json.dumps(labels), encoding="utf-8")

    reloaded = load_model(str(out_dir), task=config.task, labels=labels).eval().double()
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - reference).abs().max().item()
    result = MergeResult(out_dir, diff, reloaded.config.num_hidden_layers)
    (out_dir / MERGE_RECORD).write_text(
        json.dumps({"run_dir": str(run_dir.resolve()), "max_abs_logit_diff": diff, "probes": list(PROBES)}, indent=2)
        + "\n", encoding="utf-8",
    )
    ledger.record(out_dir, None)
    log.info("merged into %s; max |logit diff| %.2e", out_dir, diff)
    return result
