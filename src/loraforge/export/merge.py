"""`loraforge merge`: the adapter folded into its base, saved as a model plain transformers loads."""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loraforge import rundir
from loraforge.data.cache import file_digest
from loraforge.errors import ExportError, RunDirError
from loraforge import ledger
from loraforge.model.load import load_model, load_model_config
from loraforge.model.template import apply_template, save_for_plain_use
from loraforge.trained import load_run

log = logging.getLogger(__name__)

PROBES = ("Hello! Who are you?", "Write one sentence about the sea.")
MERGE_RECORD = "merge.json"


@dataclass
class MergeResult:
    out_dir: Path
    max_abs_logit_diff: float
    num_hidden_layers: int
    # The weights' dtype as saved: the base checkpoint's where it is 16-bit, else float32.
    dtype: str = "float32"

    def summary(self) -> str:
        return (
            f"Merged model: {self.out_dir} ({self.num_hidden_layers} layers, {self.dtype} as the base stores them)\n"
            f"Max |logit difference| merged ({self.dtype} weights, saved and reloaded) vs adapter: "
            f"{self.max_abs_logit_diff:.2e}"
        )


def merge_record(folder: Path) -> dict:
    """What the merged model folder was made from (its merge.json, written last); {} when there is none."""
    try:
        record = json.loads((Path(folder) / MERGE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_digest(run_dir: Path) -> str:
    """What a run's exports are made of: its trained weights (adapter or full model), its tokenizer and its system
    prompt. It changes when the run trains further, and not when the run directory is moved or copied."""
    run_dir = Path(run_dir)
    digest = hashlib.sha256()
    for folder in (rundir.ADAPTER, rundir.MODEL, rundir.TOKENIZER):
        for path in sorted((run_dir / folder).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(run_dir)}\0{file_digest(path)}\0".encode())
    digest.update(json.dumps(rundir.read_config(run_dir).data.system_prompt).encode())
    return digest.hexdigest()


def merged_is_current(folder: Path, run_dir: Path, digest: str | None = None) -> bool:
    """The folder holds this run's merge as the run is now (digest: its run_digest, where the caller has it), whole
    and unchanged since it was written."""
    return ledger.intact(folder) and merge_record(folder).get("run_digest") == (digest or run_digest(run_dir))


def stored_dtype(run_dir: Path, config):
    """The dtype the base checkpoint stores its weights in, where it is a 16-bit one: the merge is saved in it, as
    large as the base, not twice as large in fp32."""
    import torch

    base = load_model_config(rundir.base_model(run_dir, config), config.model.revision, config.model.trust_remote_code)
    dtype = getattr(base, "dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


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
    source = merge_record(out_dir).get("run_dir")
    own = out_dir.resolve() == (run_dir / rundir.MERGED).resolve()
    if source is not None and not own and Path(source).resolve() != run_dir.resolve():
        raise ExportError(f"--out {out_dir} holds the merged model of another run ({source}); choose another folder "
                          "so that run's exports keep their weights")
    digest = run_digest(run_dir)
    ledger.check(out_dir, None, "--out")
    # A quantized run merges onto the unquantized base: merged weights must be plain floats to be saved and reused.
    run = load_run(run_dir, quantized=False, gpu=False)
    config, model, tokenizer, labels = run.config, run.model, run.tokenizer, run.labels
    inputs = probe_inputs(tokenizer, config.task)
    # The check runs its forward passes in float64 (fp32 -> fp64 -> fp32 is exact), so what it measures is
    # the merged fp32 weights against the adapter, not fp32 summation noise across the layers.
    with torch.no_grad():
        reference = model.double()(**inputs).logits
    model.float()
    merged = model.merge_and_unload()
    stored = stored_dtype(run_dir, config)
    if stored is not None:
        merged.to(stored)
    ledger.claim(out_dir, None, "--out")
    merged.save_pretrained(out_dir)
    rundir.open_as_umask(out_dir)
    save_for_plain_use(tokenizer, out_dir, config.data.system_prompt if config.task == "causal_lm" else None)
    if labels is not None:
        (out_dir / rundir.LABELS).write_text(json.dumps(labels), encoding="utf-8")

    reloaded = load_model(str(out_dir), task=config.task, labels=labels).eval().double()
    with torch.no_grad():
        diff = (reloaded(**inputs).logits - reference).abs().max().item()
    dtype = str(stored or torch.float32).removeprefix("torch.")
    result = MergeResult(out_dir, diff, reloaded.config.num_hidden_layers, dtype)
    (out_dir / MERGE_RECORD).write_text(
        json.dumps({"run_dir": str(run_dir.resolve()), "run_digest": digest, "dtype": dtype, "max_abs_logit_diff": diff,
                    "probes": list(PROBES)}, indent=2)
        + "\n", encoding="utf-8",
    )
    ledger.record(out_dir, None)
    log.info("merged into %s; max |logit diff| %.2e", out_dir, diff)
    return result
