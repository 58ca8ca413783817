"""Length-grouped batches against a random order, side by side: speed and the eval loss they reach.

Length grouping cuts padding, but each batch then holds samples of similar length; this measures whether
that costs learning at the default config's own length of run, per step and per second. For each seed:
length-grouped and random order for the same steps, then random order for as many steps as fit in the
length-grouped run's training time. The eval loss of every adapter is computed in fp32 on the seed's
validation split.
Prints a table and writes bench/results/order-<date>-<cpu>.json.
Run: .venv/bin/python bench/order.py [STEPS] [SEEDS]
"""

import json
import platform
import sys
import tempfile
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fp32_eval_loss, new_result  # noqa: E402


def main(steps: int = 100, seeds: int = 2) -> None:
    import torch

    from loraforge.cli import tune_process
    from loraforge.config import load_config
    from loraforge.training.manifest import hardware
    from loraforge.training.run import run_training

    tune_process()

    work = Path(tempfile.mkdtemp(prefix="order-"))

    def run(name: str, seed: int, grouped: bool, steps: int) -> dict:
        out = work / f"{name.replace(', ', '-').replace(' ', '-')}-{seed}"
        config = load_config(
            ROOT / "configs" / "default.yaml",
            [f"seed={seed}", f"train.group_by_length={str(grouped).lower()}", f"train.max_steps={steps}",
             f"train.eval_every={steps}", "train.save_every=null", f"output_dir={out}", "eval.num_samples=0",
             "eval.samples_during_training=0", "report_to=[]"],
        )
        result = run_training(config)
        return {
            "order": name,
            "seed": seed,
            "steps": steps,
            "real_tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(result.train_seconds, 1),
            "eval_loss_fp32": round(fp32_eval_loss(out / "adapter", config), 4),
        }

    runs = []
    for seed in [42 + k for k in range(seeds)]:
        grouped = run("length-grouped", seed, True, steps)
        shuffled = run("random", seed, False, steps)
        same_time = run("random, same time", seed, False, round(steps * grouped["train_seconds"] / shuffled["train_seconds"]))
        runs += [grouped, shuffled, same_time]
    report = {
        "machine": {"cpu": hardware().get("cpu") or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "steps": steps,
        "runs": runs,
    }
    path = Path(f"{new_result('order-', ('.json',))}.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'order':<20}{'seed':>6}{'steps':>7}{'real tok/s':>12}{'train s':>10}{'eval loss (fp32)':>18}")
    for run in runs:
        print(f"{run['order']:<20}{run['seed']:>6}{run['steps']:>7}{run['real_tokens_per_s']:>12}{run['train_seconds']:>10}"
              f"{run['eval_loss_fp32']:>18}")
    loss = {o: mean(r["eval_loss_fp32"] for r in runs if r["order"] == o)
            for o in ("length-grouped", "random", "random, same time")}
    speed = {o: mean(r["real_tokens_per_s"] for r in runs if r["order"] == o) for o in ("length-grouped", "random")}
    print(f"mean over {seeds} seeds: length-grouped {speed['length-grouped'] / speed['random']:.2f}x the random order's "
          f"tokens/s; its eval loss {100 * (loss['length-grouped'] / loss['random'] - 1):+.2f}% against random order "
          f"after the same steps, {100 * (loss['length-grouped'] / loss['random, same time'] - 1):+.2f}% after the same "
          f"training time  -> {path}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
