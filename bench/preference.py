"""DPO beside SFT on this machine, side by side in one run: configs/dpo.yaml against configs/default.yaml on the
built-in model, the same number of optimizer steps of 8 examples (SFT: 8 conversations; DPO: 8 pairs, each a
chosen and a rejected answer plus the reference pass). Each run is its own process, so its peak RSS is its own.
Prints a table and writes bench/results/preference-<date>-<cpu>.json and .md.
Run: .venv/bin/python bench/preference.py [STEPS]
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, new_result  # noqa: E402

QUIET = ["train.eval_every=100000", "train.save_every=null", "eval.num_samples=0", "eval.samples_during_training=0",
         "report_to=[]", "data.val_fraction=0.01"]
RUNS = {"sft": "configs/default.yaml", "dpo": "configs/dpo.yaml"}


def child(name: str, steps: int) -> None:
    from loraforge.cli import tune_process
    from loraforge.config import load_config
    from loraforge.training.run import run_training

    tune_process()
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) / "run"
    config = load_config(ROOT / RUNS[name], [*QUIET, f"train.max_steps={steps}", f"output_dir={out}"])
    result = run_training(config)
    report = json.loads((out / "eval.json").read_text())
    print("RESULT " + json.dumps({
        "train_seconds": report["train_seconds"],
        "real_tokens": report["real_tokens"],
        "padded_tokens": report["padded_tokens"],
        "step_seconds": result.timing["step_seconds"],
        "precision": result.precision,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)


def measure(name: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, str(steps)], capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    raw = json.loads(line[len("RESULT "):])
    later = raw["step_seconds"][1:]
    return {
        "run": name,
        "config": RUNS[name],
        "precision": raw["precision"],
        "real_tokens_per_s": round(raw["real_tokens"] / raw["train_seconds"], 1),
        "padded_tokens_per_s": round(raw["padded_tokens"] / raw["train_seconds"], 1),
        "seconds_per_step": round(raw["train_seconds"] / steps, 2),
        "seconds_per_step_after_first": round(sum(later) / len(later), 2) if later else None,
        "examples_per_s": round(8 * steps / raw["train_seconds"], 2),
        "peak_rss_mb": raw["peak_rss_mb"],
    }


def main(steps: int = 10) -> None:
    from loraforge.model.precision import cpu_bf16_features
    from loraforge.training.manifest import hardware

    started = time.time()
    rows = [measure(name, steps) for name in RUNS]
    flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in cpu_bf16_features().items())
    cpu = f"{hardware().get('cpu') or 'unknown CPU'} ({flags})"
    report = {"date": date.today().isoformat(), "cpu": cpu, "steps": steps, "runs": rows,
              "wall_seconds": round(time.time() - started, 1)}
    sft, dpo = rows
    lines = [f"Measured {report['date']} on {cpu}: {steps} optimizer steps of 8 examples each, side by side.", "",
             "| run | precision | real tok/s | padded tok/s | s/step | s/step after the first | examples/s | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['run']} ({r['config']}) | {r['precision']} | {r['real_tokens_per_s']} | {r['padded_tokens_per_s']} | "
              f"{r['seconds_per_step']} | {r['seconds_per_step_after_first']} | {r['examples_per_s']} | {r['peak_rss_mb']} |"
              for r in rows]
    lines += ["", f"A DPO step takes {dpo['seconds_per_step'] / sft['seconds_per_step']:.1f}x an SFT step and "
              f"{dpo['peak_rss_mb'] / sft['peak_rss_mb']:.2f}x its peak RSS."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = new_result("preference-")
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    Path(f"{out}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main(*(int(a) for a in sys.argv[1:2]))
