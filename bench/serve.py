"""`loraforge serve` under load, with and without batching, side by side in one run: N concurrent clients each
send R chat requests (greedy, max_tokens T) to a server on a free port on 127.0.0.1; requests/s, p50/p95
latency and generated tokens/s for --max-batch 1 (one request at a time) and --max-batch N.

    python bench/serve.py [RUN_DIR ...] [--clients 16] [--requests 2] [--max-tokens 32]

Without RUN_DIR it trains two 2-step runs of configs/default.yaml on the built-in model (offline) and serves
both from one base, the clients alternating between them. Results: bench/results/serve-<date>.md.
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello", "What is AI?", "Tell me a joke.", "Who are you?", "What is your favourite colour?",
           "Do you like music?", "What do you do?", "Are you a robot?"]


def quick_runs(folder: Path) -> list[str]:
    from loraforge.config import load_config
    from loraforge.training.run import run_training

    runs = []
    for name, rate in (("serve-a", 2e-4), ("serve-b", 1e-3)):
        config = load_config(ROOT / "configs" / "default.yaml", [
            f"output_dir={folder / name}", "train.max_steps=2", f"train.learning_rate={rate}", "train.eval_every=1000",
            "train.save_every=null", "eval.num_samples=0", "eval.sample_prompts=[]", "report_to=[]"])
        run_training(config)
        runs.append(str(folder / name))
    return runs


def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600, max_retries=0)
        barrier.wait(timeout=60)
        for turn in range(requests):
            started = time.perf_counter()
            answer = api.chat.completions.create(
                model=models[index % len(models)], temperature=0, max_tokens=max_tokens,
                messages=[{"role": "user", "content": PROMPTS[(index + turn) % len(PROMPTS)]}])
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += answer.usage.completion_tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=1800)
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_s": round(statistics.median(ordered), 2), "p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            "tokens_per_s": round(tokens[0] / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import platform

    from loraforge.cli import tune_process
    from loraforge.serve.run import Background, build

    tune_process()
    runs = args.runs or quick_runs(Path(tempfile.mkdtemp(prefix="bench-serve-")))
    rows = []
    for max_batch in (1, args.clients):
        app, engine, names = build(runs, max_batch=max_batch, timeout_s=1800)
        server = Background(app)
        try:
            load(server.url, names[: len(runs)], 2, 1, 4)
            engine.batch_sizes.clear()
            found = load(server.url, names[: len(runs)], args.clients, args.requests, args.max_tokens)
            found["max_batch"], found["mean_batch"] = max_batch, round(statistics.mean(engine.batch_sizes), 1)
            rows.append(found)
        finally:
            server.stop()
            engine.close()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [f"Measured {date.today()} on {cpu}: {args.clients} clients x {args.requests} chat requests, greedy, "
             f"max_tokens {args.max_tokens}, runs {', '.join(Path(r).name for r in runs)} on one base.", "",
             "| --max-batch | mean batch | requests/s | p50 latency s | p95 latency s | generated tok/s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['max_batch']} | {r['mean_batch']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['tokens_per_s']} | {r['wall_s']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"serve-{date.today()}.md"
    out.write_text(text, encoding="utf-8")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
