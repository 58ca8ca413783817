"""The common fine-tuning script against loraforge, side by side in one run, on this machine.

Same model (built-in SmolLM2-135M-Instruct), same data (bundled chatterbot, the same tokens and
assistant-only labels for every run), same seed, same number of optimizer steps and examples (8 per step):
  seed_style  HF Trainer + PEFT LoRA r=16 (dropout 0.05) on q,k,v,o, fp32, every sample padded to 512,
              batch 1 x accumulation 8, fed the same 8 examples at each step as the default run
  default     loraforge with configs/default.yaml
  fastest     the fastest loraforge configuration among the candidates below (all keep 8 examples per step;
              packing is left out: a packed row of 8 x 512 tokens attends over 4096 positions, far slower on CPU)
The candidates include fp32 and bf16 forced, so the table shows in the same run whether precision auto
(the default) picked the faster of the two on this machine; the header names the CPU, its bf16 features
and both matmul peaks. Each run is a separate process, so its peak RSS is its own, and its time to first step counts from the
process start (imports included). Eval loss is computed the same way for every adapter: fp32 base, the
default config's validation split. The default runs again last and the matmul peaks are measured again, so the
table shows how far the machine drifted while the bench ran. Writes bench/results/<date>-<cpu>.json and .md (cpu:
vendor-family-model, e.g. 2026-12-07-amd-25-17), so machines measured on one day keep their own.
Run: make bench   (or .venv/bin/python bench/compare.py [STEPS])
"""

import ctypes.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, flops_per_token, fp32_eval_loss, matmul_peak_gflops, model_parameters, new_result  # noqa: E402

EXAMPLES_PER_STEP = 8
DEFAULT = "default (batch 4 x accumulation 2, micro_batch_tokens 256, LoRA dropout 0)"
CANDIDATES = {
    DEFAULT: [],
    "batch 8": ["train.batch_size=8", "train.grad_accum=1"],
    "batch 2 x accumulation 4": ["train.batch_size=2", "train.grad_accum=4"],
    "micro_batch_tokens 512": ["train.micro_batch_tokens=512"],
    "no micro_batch_tokens limit": ["train.micro_batch_tokens=null"],
    "LoRA dropout 0.05": ["lora.dropout=0.05"],
    "precision fp32": ["precision=fp32"],
    "precision bf16": ["precision=bf16"],
    "micro_batch_tokens 128": ["train.micro_batch_tokens=128"],
    "precision fp32, micro_batch_tokens 128": ["precision=fp32", "train.micro_batch_tokens=128"],
}
# How OpenMP threads wait is not a setting of the config: loraforge train makes them spin between kernels
# (training/cpu_threads.py); GOMP_SPINCOUNT at libgomp's own default keeps its spin-then-sleep, measured beside it.
# glibc's mmap threshold, which the user may set and loraforge then keeps (training/cpu_memory.py), below its 1 MiB.
# An allocator neither: measured beside the candidates where the system has it (Debian's libjemalloc2; nothing pip
# installs brings it), loaded before the process starts. None of these is taken as "fastest". A threshold in the
# user's own GLIBC_TUNABLES outranks the 256 KiB row's variable (glibc reads the tunable first). glibc's per-thread
# cache and fast bins off: read at process start only, so loraforge cannot set them for itself (README, fp32 ... what
# was tried).
JEMALLOC = ctypes.util.find_library("jemalloc")
ENVIRONMENT_CANDIDATES = {
    "OpenMP threads sleep after libgomp's default spin (GOMP_SPINCOUNT=300000)": ([], {"GOMP_SPINCOUNT": "300000"}),
    "malloc mmap threshold 256 KiB, less memory for speed (MALLOC_MMAP_THRESHOLD_=262144)": (
        [], {"MALLOC_MMAP_THRESHOLD_": "262144"}),
    "glibc's tcache and fastbins off (GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0)": (
        [], {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"}),
    **({"precision fp32, jemalloc (freed pages kept 1 s)": (["precision=fp32"], {
        "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "dirty_decay_ms:1000,muzzy_decay_ms:0"})} if JEMALLOC else {}),
}
QUIET = ["train.eval_every=100000", "train.save_every=null", "eval.num_samples=0", "eval.samples_during_training=0",
         "report_to=[]", "data.val_fraction=0.05"]


def default_config(*overrides):
    from loraforge.config import load_config

    return load_config(ROOT / "configs" / "default.yaml", list(overrides))


def run_loraforge(steps: int, overrides: list[str], out: Path) -> dict:
    from loraforge.training.bitsandbytes_import import leave_out_bitsandbytes

    config = default_config(*QUIET, f"train.max_steps={steps}", f"output_dir={out}", *overrides)
    leave_out_bitsandbytes(config)
    from loraforge.training.run import run_training

    called_at = time.time()
    started = time.perf_counter()
    result = run_training(config)
    report = json.loads((out / "eval.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "precision": manifest["precision"]["chosen"],
        "precision_record": manifest["precision"],
        "train_seconds": report["train_seconds"],
        "real_tokens": report["real_tokens"],
        "padded_tokens": report["padded_tokens"],
        "first_step_at": called_at + report["first_step_seconds"],
        "wall_s": time.perf_counter() - started,
        "adapter": str(out / "adapter"),
        "tokens_per_s_reported": result.tokens_per_s,
    }


def run_seed_style(steps: int, out: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainerCallback, TrainingArguments

    from loraforge.internals import HookedTrainer
    from loraforge.training.prepare import prepare
    from loraforge.training.trainer import length_grouped_order

    started = time.perf_counter()
    config = default_config(*QUIET)
    data = prepare(config)
    tokenizer = data.tokenizer
    model = AutoModelForCausalLM.from_pretrained(data.model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))

    class SameExamples(HookedTrainer):
        """The default run's batch order (length groups of 4, seeded): step k sees the same 8 examples."""

        def train_sampler(self, default):
            group = config.train.batch_size * config.train.grad_accum  # HF groups by the examples of a step
            return length_grouped_order([len(ids) for ids in data.train["input_ids"]], group, config.seed)

    class Timing(TrainerCallback):
        first = None
        seconds = 0.0
        begun = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begun = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.begun
            self.first = self.first or time.time()

    timing = Timing()
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=1, gradient_accumulation_steps=EXAMPLES_PER_STEP,
        max_steps=steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, save_strategy="no",
        report_to="none", use_cpu=True, seed=config.seed, logging_steps=10, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    trainer = SameExamples(model=model, args=args, train_dataset=data.train, callbacks=[timing],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=512))
    trainer.train()
    model.save_pretrained(out / "adapter")
    real = trainer.state.num_input_tokens_seen
    return {
        "precision": "fp32",
        "train_seconds": timing.seconds,
        "real_tokens": real,
        "padded_tokens": steps * EXAMPLES_PER_STEP * 512,
        "first_step_at": timing.first,
        "wall_s": time.perf_counter() - started,
        "adapter": str(out / "adapter"),
    }


def child(name: str, steps: int, overrides: list[str], launched_at: float) -> None:
    from loraforge.cli import tune_process
    from loraforge.training.cpu_threads import spin_between_kernels

    if name != "seed_style":
        spin_between_kernels()
    tune_process()
    if name == "estimate":
        from loraforge.training.bitsandbytes_import import leave_out_bitsandbytes

        config = default_config(*QUIET, f"train.max_steps={steps}", *overrides)
        leave_out_bitsandbytes(config)
        from loraforge.training.estimate import run_estimate

        estimate = run_estimate(config)
        print("RESULT " + json.dumps({"seconds_per_step": estimate.seconds_per_step, "peak_rss_mb": estimate.peak_rss_mb}),
              flush=True)
        return
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name.replace(' ', '_')}-"))
    found = run_seed_style(steps, out / "run") if name == "seed_style" else run_loraforge(steps, overrides, out / "run")
    found["first_step_s"] = found.pop("first_step_at") - launched_at
    found["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    found["eval_loss"] = round(fp32_eval_loss(Path(found["adapter"]), default_config(*QUIET)), 4)
    print("RESULT " + json.dumps(found), flush=True)


def measure(name: str, steps: int, overrides: list[str], env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, str(steps), json.dumps(overrides), str(time.time())],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def summarise(name: str, raw: dict, steps: int, flops_token: float, peaks: dict, overrides=None) -> dict:
    real_per_s = raw["real_tokens"] / raw["train_seconds"]
    peak = peaks["bf16"] if raw["precision"] == "bf16" else peaks["fp32"]
    return {
        "name": name,
        "overrides": overrides or [],
        "precision": raw["precision"],
        "real_tokens_per_s": round(real_per_s, 1),
        "padded_tokens_per_s": round(raw["padded_tokens"] / raw["train_seconds"], 1),
        "seconds_per_step": round(raw["train_seconds"] / steps, 2),
        "peak_rss_mb": raw["peak_rss_mb"],
        "eval_loss": raw["eval_loss"],
        "first_step_s": round(raw["first_step_s"], 1),
        "mfu": round(real_per_s * flops_token / (peak * 1e9), 4),
    }


def main(steps: int = 20) -> None:
    import platform

    import torch

    torch.set_num_threads(2)
    peaks = {"fp32": round(matmul_peak_gflops("float32"), 1), "bf16": round(matmul_peak_gflops("bfloat16"), 1)}
    n_params, model_config = model_parameters("smollm2-135m-instruct")
    runs = []
    from loraforge.model.precision import cpu_bf16_features
    from loraforge.training.manifest import hardware

    raw = measure("seed_style", steps, [])
    mean_length = raw["real_tokens"] / (steps * EXAMPLES_PER_STEP)
    flops_token = flops_per_token(n_params, model_config, mean_length)
    runs.append(summarise("seed_style", raw, steps, flops_token, peaks))
    candidates = {label: measure(label, steps, overrides) for label, overrides in CANDIDATES.items()}
    runs.append(summarise("default", candidates[DEFAULT], steps, flops_token, peaks))
    best = max(candidates, key=lambda k: candidates[k]["real_tokens"] / candidates[k]["train_seconds"])
    runs.append(summarise("fastest", candidates[best], steps, flops_token, peaks, CANDIDATES[best]))
    tried = {label: summarise(label, r, steps, flops_token, peaks, CANDIDATES[label]) for label, r in candidates.items()}
    for label, (overrides, env) in ENVIRONMENT_CANDIDATES.items():
        tried[label] = summarise(label, measure(label, steps, overrides, env), steps, flops_token, peaks,
                                 [*overrides, *(f"{k}={v}" for k, v in env.items())])
    predicted = measure("estimate", steps, [])
    again = summarise("default, again", measure("default, again", steps, []), steps, flops_token, peaks)
    peaks_after = {p: round(matmul_peak_gflops(dtype), 1) for p, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))}
    default = runs[1]
    auto = candidates[DEFAULT]["precision_record"]
    speed = {p: tried[f"precision {p}"]["real_tokens_per_s"] for p in ("fp32", "bf16")}
    precision = {
        "auto_chose": auto["chosen"],
        "reason": auto["reason"],
        "real_tokens_per_s": speed,
        "faster": max(speed, key=speed.get),
        "auto_is_faster": auto["chosen"] == max(speed, key=speed.get),
    }
    estimate = {
        "predicted_seconds_per_step": round(predicted["seconds_per_step"], 2),
        "measured_seconds_per_step": default["seconds_per_step"],
        "step_time_error": round(predicted["seconds_per_step"] / default["seconds_per_step"] - 1, 3),
        "predicted_peak_rss_mb": round(predicted["peak_rss_mb"], 1),
        "measured_peak_rss_mb": default["peak_rss_mb"],
        "peak_rss_error": round(predicted["peak_rss_mb"] / default["peak_rss_mb"] - 1, 3),
    }

    report = {
        "machine": {"cpu": hardware().get("cpu") or platform.machine(), "threads": 2, "torch": torch.__version__,
                    "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                    "bf16_features": cpu_bf16_features(), "matmul_peak_gflops_2048": peaks},
        "precision": precision,
        "model": {"name": "smollm2-135m-instruct", "parameters": n_params},
        "setup": {"steps": steps, "examples_per_step": EXAMPLES_PER_STEP, "mean_real_tokens_per_example": round(mean_length, 1),
                  "flops_per_token": f"4*N + 8*L*s*d = {flops_token / 1e9:.3f} GFLOP (frozen-base LoRA; N params, "
                                     "L layers, s mean length, d hidden)"},
        "runs": runs,
        "fastest_candidates": tried,
        "estimate_vs_measured": estimate,
        # The same default run at the start and at the end, and the matmul peaks again: how far the machine drifted.
        "drift": {"default_first": default["real_tokens_per_s"], "default_last": again["real_tokens_per_s"],
                  "matmul_peak_gflops_2048_after": peaks_after},
    }
    out = new_result()
    Path(f"{out}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    Path(f"{out}.md").write_text(table)
    print(table)
    print(f"written to {out}.json and .md")


def markdown(report: dict) -> str:
    seed = report["runs"][0]
    machine, precision = report["machine"], report["precision"]
    flags = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in machine["bf16_features"].items())
    capped = machine.get("onednn_max_cpu_isa")
    lines = [
        *([f"Run with ONEDNN_MAX_CPU_ISA={capped} (oneDNN limited to that instruction set: on an AVX-512 CPU "
           "AVX512_CORE_VNNI makes it emulate bf16, as a CPU without AVX512-BF16 does; CPU flags as reported, "
           "unchanged).", ""] if capped else []),
        f"Measured {date.today().isoformat()} on {machine['cpu']} ({flags}): {report['setup']['steps']} steps x "
        f"{report['setup']['examples_per_step']} examples, {machine['threads']} threads; matmul peak fp32 "
        f"{machine['matmul_peak_gflops_2048']['fp32']} / bf16 {machine['matmul_peak_gflops_2048']['bf16']} GFLOP/s.",
        "",
        f"precision auto chose {precision['auto_chose']} ({precision['reason']}); side by side: fp32 "
        f"{precision['real_tokens_per_s']['fp32']} tok/s, bf16 {precision['real_tokens_per_s']['bf16']} tok/s: "
        f"{precision['faster']} is faster, auto {'picked it' if precision['auto_is_faster'] else 'DID NOT pick it'}.",
        "",
        "| run | precision | real tok/s | padded tok/s | s/step | peak RSS MB | eval loss (fp32) | first step s* | MFU | vs seed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        label = run["name"] + (f" ({', '.join(run['overrides'])})" if run["overrides"] else "")
        lines.append(
            f"| {label} | {run['precision']} | {run['real_tokens_per_s']} | {run['padded_tokens_per_s']} | "
            f"{run['seconds_per_step']} | {run['peak_rss_mb']} | {run['eval_loss']} | {run['first_step_s']} | "
            f"{run['mfu']:.1%} | {run['real_tokens_per_s'] / seed['real_tokens_per_s']:.1f}x |"
        )
    default = report["runs"][1]
    lines += ["", f"\\* seconds from process start (imports included) until the first optimizer step is done. Default vs "
              f"seed_style: {default['real_tokens_per_s'] / seed['real_tokens_per_s']:.1f}x real tokens/s, peak RSS "
              f"{default['peak_rss_mb'] / seed['peak_rss_mb']:.0%}, eval loss {default['eval_loss'] / seed['eval_loss'] - 1:+.2%}.",
              "", "Candidates, side by side in the same run:", "",
              "| candidate | real tok/s | vs seed | s/step | peak RSS MB | of seed's RSS | eval loss (fp32) | first step s* |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, run in report["fastest_candidates"].items():
        lines.append(f"| {label} | {run['real_tokens_per_s']} | {run['real_tokens_per_s'] / seed['real_tokens_per_s']:.1f}x | "
                     f"{run['seconds_per_step']} | {run['peak_rss_mb']} | {run['peak_rss_mb'] / seed['peak_rss_mb']:.0%} | "
                     f"{run['eval_loss']} | {run['first_step_s']} |")
    e = report["estimate_vs_measured"]
    lines += ["", f"`loraforge estimate` for the default run: {e['predicted_seconds_per_step']} s/step predicted, "
              f"{e['measured_seconds_per_step']} measured ({e['step_time_error']:+.0%}); peak RSS "
              f"{e['predicted_peak_rss_mb']:.0f} MB predicted, {e['measured_peak_rss_mb']:.0f} MB measured "
              f"({e['peak_rss_error']:+.0%})."]
    d = report.get("drift")
    if d is not None:
        after = d["matmul_peak_gflops_2048_after"]
        lines += ["", f"The machine's drift over this run: the default, run again last, {d['default_last']} real tok/s "
                  f"against {d['default_first']} first ({d['default_last'] / d['default_first'] - 1:+.0%}); matmul peak "
                  f"at the end fp32 {after['fp32']} / bf16 {after['bf16']} GFLOP/s. Differences between runs smaller "
                  "than the two defaults' are within the machine's noise."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), float(sys.argv[5]))
    else:
        main(*(int(a) for a in sys.argv[1:]))
