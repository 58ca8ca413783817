"""fp32 against bf16 (bf16 frozen weights + bf16 autocast, LoRA weights fp32) on this machine, side by side.

Same model, data, seed and steps; eval loss of both adapters is computed in fp32 on the same validation
set, so only the training precision differs. Prints a table and writes bench/results/precision-<date>-<cpu>.json.
Run: .venv/bin/python bench/precision.py [STEPS]
"""

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, fp32_eval_loss, new_result  # noqa: E402


def main(steps: int = 40) -> None:
    import resource

    import torch

    from loraforge.config import load_config
    from loraforge.training.run import run_training

    work = Path(tempfile.mkdtemp(prefix="precision-"))
    runs = []
    for precision in ("fp32", "bf16"):
        config = load_config(
            ROOT / "configs" / "default.yaml",
            [f"precision={precision}", f"train.max_steps={steps}", f"train.eval_every={steps}",
             f"output_dir={work / precision}", "eval.sample_prompts=[Hello]", "eval.max_new_tokens=1"],
        )
        started = time.perf_counter()
        result = run_training(config)
        runs.append({
            "name": precision,
            "real_tokens_per_s": round(result.tokens_per_s, 1),
            "train_seconds": round(result.train_seconds, 1),
            "eval_loss_fp32": round(fp32_eval_loss(work / precision / "adapter", config), 4),
            "eval_loss_before": round(result.eval_before, 4),
            "wall_seconds": round(time.perf_counter() - started, 1),
        })
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024},
        "steps": steps,
        "runs": runs,
    }
    out = Path(f"{new_result('precision-', ('.json',))}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'precision':<10}{'real tok/s':>12}{'train s':>10}{'eval loss (fp32)':>18}")
    for run in runs:
        print(f"{run['name']:<10}{run['real_tokens_per_s']:>12}{run['train_seconds']:>10}{run['eval_loss_fp32']:>18}")
    fp32, bf16 = runs
    print(f"bf16 speed-up {bf16['real_tokens_per_s'] / fp32['real_tokens_per_s']:.2f}x, "
          f"eval loss {100 * (bf16['eval_loss_fp32'] / fp32['eval_loss_fp32'] - 1):+.1f}%  -> {out}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
