"""`loraforge export gguf`: the merged model through llama.cpp's own converter, then checked by reloading."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from loraforge import rundir
from loraforge.errors import ExportError, Interrupted
from loraforge.internals import gguf_model
from loraforge import ledger
from loraforge.export.merge import merged_is_current, run_digest, run_merge
from loraforge.model.template import apply_template

LLAMA_CPP_PYTHON = "0.3.36"
TYPES = ("f16", "q8_0")


def converter_dir() -> Path:
    """Where `make setup` puts convert_hf_to_gguf.py (from the llama-cpp-python sdist); LORAFORGE_LLAMA_CPP overrides."""
    return Path(os.environ.get("LORAFORGE_LLAMA_CPP") or Path(sys.prefix) / "share" / "loraforge" / "llama.cpp")


def model_source(run_dir: Path, digest: str | None = None) -> Path:
    """A folder holding the full model and its tokenizer: RUN_DIR/model for full runs, else RUN_DIR/merged, merged
    again unless it holds the run as it is now (digest: its run_digest, where the caller has it)."""
    if (run_dir / rundir.MODEL / "config.json").is_file():
        return run_dir / rundir.MODEL
    merged = run_dir / rundir.MERGED
    if not merged_is_current(merged, run_dir, digest):
        run_merge(run_dir, merged)
    return merged


def gguf_is_current(run_dir: Path, kind: str, digest: str) -> bool:
    """RUN_DIR/export holds this kind of GGUF, whole, made from the run as it is now (its run_digest)."""
    out = gguf_path(run_dir, kind)
    record = out.parent / f"{out.stem}.json"
    if not (ledger.written(out.parent, out.name) and ledger.written(out.parent, record.name)):
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("run_digest") == digest
    except ValueError:
        return False


def refuse_other_tasks(run_dir: Path) -> None:
    config = rundir.read_config(run_dir)
    if config.task != "causal_lm":
        raise ExportError(f"{run_dir} is a {config.task} run; GGUF export is for causal language models")


def gguf_path(run_dir: Path, kind: str) -> Path:
    return Path(run_dir) / rundir.EXPORT / f"model-{kind}.gguf"


def run_export_gguf(run_dir: str | Path, kind: str = "q8_0", digest: str | None = None) -> Path:
    """digest: the run's run_digest, where the caller has it (it hashes the run's weights)."""
    run_dir = Path(run_dir)
    refuse_other_tasks(run_dir)
    if kind not in TYPES:
        raise ExportError(f"--type {kind}: choose one of {', '.join(TYPES)}")
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise ExportError(
            f"llama.cpp's converter is not at {script}; run `make setup`, or fetch it from the "
            f"llama-cpp-python=={LLAMA_CPP_PYTHON} source distribution and set LORAFORGE_LLAMA_CPP to its llama.cpp folder"
        )
    out = gguf_path(run_dir, kind)
    record = out.parent / f"{out.stem}.json"
    ledger.check(out.parent, [out.name, record.name], "export")
    digest = digest or run_digest(run_dir)
    source = model_source(run_dir, digest)
    ledger.claim(out.parent, [out.name, record.name], "export")
    partial = out.parent / f".{out.name}.partial"
    returncode, stderr = _convert([sys.executable, str(script), str(source), "--outfile", str(partial), "--outtype",
                                   kind], partial, out)
    if returncode != 0:
        partial.unlink(missing_ok=True)
        raise ExportError(f"llama.cpp's converter failed on {source}:\n{stderr[-3000:]}")
    template = chat_template_of(partial)
    expected = (source / "chat_template.jinja").read_text(encoding="utf-8") if (source / "chat_template.jinja").is_file() else None
    if expected is not None and template != expected:
        partial.unlink(missing_ok=True)
        raise ExportError(f"{out} would hold another chat template than the model's tokenizer; the export is not "
                          "usable")
    os.replace(partial, out)
    record.write_text(
        json.dumps({"source": str(source.resolve()), "run_digest": digest, "type": kind,
                    "converter": f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "chat_template_embedded": template is not None},
                   indent=2) + "\n",
        encoding="utf-8",
    )
    ledger.record(out.parent, [out.name, record.name])
    return out


def _convert(command: list[str], partial: Path, out: Path) -> tuple[int, str]:
    """llama.cpp's converter, writing `partial`: (its exit code, its stderr). SIGINT or SIGTERM stops it with this
    process, removes what it wrote, and raises Interrupted."""
    stopped = []

    def stop(signum, frame):
        stopped.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = None
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, stderr = process.communicate()
        return process.returncode, stderr
    except KeyboardInterrupt:
        name = stopped[0] if stopped else "SIGINT"
        raise Interrupted(f"stopped by {name} while llama.cpp's converter wrote {out.name}: it is stopped too and "
                          f"nothing was written to {out}; run the export again", name) from None
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if process is None or process.returncode != 0:
            partial.unlink(missing_ok=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def chat_template_of(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def compare_generations(gguf: Path, model_dir: Path, prompts: list[str], max_new_tokens: int = 16) -> list[dict]:
    """Greedy answers of the GGUF (loaded back with transformers) and of the model it came from, and, on the
    model's own answer fed to both, the share of positions where their top tokens agree and the largest
    logit difference. Lossy GGUF types round the weights, so a greedy answer may part ways at a near-tie
    while the logits stay close."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reloaded = gguf_model(str(gguf), like=reference).eval()
    rows = []
    for prompt in prompts:
        inputs = apply_template(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        start = inputs["input_ids"].shape[1]
        with torch.no_grad():
            answer = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            theirs = reloaded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, start:]
            a = reference(answer).logits[0, start - 1 : -1]
            b = reloaded(answer).logits[0, start - 1 : -1]
        rows.append({
            "prompt": prompt,
            "model": tokenizer.decode(answer[0, start:]),
            "gguf": tokenizer.decode(theirs),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "max_abs_logit_diff": (a - b).abs().max().item(),
        })
    return rows
